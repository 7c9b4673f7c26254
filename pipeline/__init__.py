"""The GoogLeNet trainer."""
