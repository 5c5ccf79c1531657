"""pyflannel: a pure-Python, drop-in re-implementation of flanneld."""

__version__ = "0.1.0"
