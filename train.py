"""Train GoogLeNet: ``accelerate launch train.py [--config configs/NAME.yaml] [key=value ...]``."""
from pipeline.train.cli import main

if __name__ == "__main__":
    main()
