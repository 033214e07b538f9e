"""Coordinator side: the Flower ServerApp that drives the rounds."""
