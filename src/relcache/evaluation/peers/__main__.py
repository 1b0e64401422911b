"""``python -m relcache.evaluation.peers``: recalibrate the peers' thresholds on the shipped reference model."""

from .calibrate import main

if __name__ == "__main__":
    main()
