"""DDP rendezvous helpers: the interface that carries a worker's address (GLOO/NCCL_SOCKET_IFNAME).
The rendezvous across hosts itself is tested in tests/test_multihost.py (root only)."""

from __future__ import annotations

from segcore.training.distributed import _interface_of, _own_host


def test_interface_of_an_address():
    assert _interface_of("127.0.0.1") == "lo"
    assert _interface_of("192.0.2.253") is None  # TEST-NET-1: on no interface here
    assert _interface_of(None) is None


def test_own_host_outside_a_worker_is_none():
    assert _own_host() is None
