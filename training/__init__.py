"""Simulation of scanner studies, dataset building, training and evaluation."""
