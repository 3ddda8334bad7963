"""openaigw: an OpenAI API gateway built on Twisted."""

__version__ = "0.1.0"
