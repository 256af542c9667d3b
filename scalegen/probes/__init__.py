"""Downstream probes on frozen features: linear and semi-supervised (few labels per class)."""

from scalegen.probes.linear import ProbeResult, ProbeSettings, labelled_subset, linear_probe, standardize

__all__ = ["ProbeResult", "ProbeSettings", "labelled_subset", "linear_probe", "standardize"]
