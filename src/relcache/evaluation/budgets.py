"""The budgets ``bench`` and ``demo`` compare at: NFC of 50 DDIM steps (full steps per generation) and the FORA
interval that gives each, as in the RFC paper's tables. Plain numbers in a module of their own, so that the
command's parser reads them without importing torch."""

from __future__ import annotations

#: NFC of 50 DDIM steps with warm-up 2 -> the interval that gives it (the paper's table)
INTERVAL_FOR_NFC = {14: 4, 11: 5, 10: 6, 8: 7, 7: 9}
DEFAULT_BUDGETS = (14, 11, 10, 8, 7)
