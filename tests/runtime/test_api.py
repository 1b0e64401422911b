"""The public API's own examples run as written."""

import doctest

import relcache.api


def test_enable_docstring_example_runs():
    result = doctest.testmod(relcache.api, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
