"""The Ray roles: thin shells over the `cai_ray` core.

Each is a plain class that `ray.remote` wraps where it is wired; importing this package imports
no ray (modules import it inside the functions that need it).
"""
