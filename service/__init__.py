"""Anemia screening inference service: palpebral-conjunctiva photo in, anemia probability out."""

__version__ = "0.1.0"
