"""Train GoogLeNet: ``accelerate launch train.py [--config configs/NAME.yaml] [key=value ...]``."""
from pipeline.cli import main

if __name__ == "__main__":
    main()
