"""Sequence ops. `wkv6(r, k, v, log_w, u, state)`: r/k/v/log_w [B,T,H,N] (log_w = log-decay),
u [H,N], state [B,H,N,N] as [key, value] float32; see `rwkv_ray.ops.wkv`."""

from rwkv_ray.ops.wkv import WKV_IMPLS, resolve_wkv_impl, wkv6

__all__ = ["WKV_IMPLS", "resolve_wkv_impl", "wkv6"]
