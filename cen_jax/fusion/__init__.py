"""Fusion by exchange: the pure, parameter-free ops (`ops`) and the registry that places them in
the networks, with the built-in fusions (`registry`: cen, asymfusion, none, ...)."""

from cen_jax.fusion import ops, registry
from cen_jax.fusion.registry import Fusion, Site, get, point_fn, register

__all__ = ['ops', 'registry', 'Fusion', 'Site', 'get', 'point_fn', 'register']
