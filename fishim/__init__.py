"""fishim: the real-time messaging backbone of a tackle shop's order delivery."""

__version__ = "0.1.0"
