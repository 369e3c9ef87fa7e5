"""Corpus sources: each module turns one downloaded package into plain-text documents."""
