"""kernels.check_moe_comm_backend: DeepEP v2 (the ElasticBuffer API torchtitan 0.3.0 calls) passes, a
v1 install (PyPI's deep-ep 1.0.0: `Buffer` only) or a v2 missing a keyword torchtitan passes is refused
in one line saying what to install. DeepEP needs CUDA, so the modules here are stand-ins put in
sys.modules whose classes carry DeepEP's own signatures (v2: deep_ep/buffers/elastic.py at 2.1.0, the
parameters up to the ones torchtitan passes; v1: the legacy Buffer); the check reads only that surface."""

import importlib.machinery
import sys
import types

import pytest

import kernels


class ElasticBufferV2:
    def __init__(self, group, num_bytes=None, num_cpu_bytes=0, num_max_tokens_per_rank=0, hidden=0, num_topk=0,
                 use_fp8_dispatch=False, deterministic=False, allow_hybrid_mode=True, explicitly_destroy=False):
        pass

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk=0, use_fp8_dispatch=False,
                             allow_hybrid_mode=True, allow_multiple_reduction=True):
        pass

    def get_theoretical_num_sms(self, num_experts, num_topk, num_scaleout_topk=0, rdma_gbs=0, nvlink_gbs=0):
        pass

    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None,
                 num_experts=None, num_max_tokens_per_rank=None, expert_alignment=None, num_sms=0, num_qps=0,
                 previous_event=None, async_with_compute_stream=False, allocate_on_comm_stream=False,
                 handle=None, do_handle_copy=True, do_cpu_sync=None, do_expand=False):
        pass

    def combine(self, x, handle, topk_weights=None, bias=None, num_sms=0, num_qps=0, previous_event=None,
                async_with_compute_stream=False, allocate_on_comm_stream=False):
        pass


class BufferV1:  # DeepEP 1.x: separate high-throughput and low-latency calls, no ElasticBuffer
    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24):
        pass

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, is_token_in_rank=None, topk_idx=None):
        pass

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts):
        pass


def fake_deep_ep(monkeypatch, version: str, **classes) -> None:
    module = types.ModuleType("deep_ep")
    module.__spec__ = importlib.machinery.ModuleSpec("deep_ep", None)  # as an installed one has
    module.__version__ = version
    for name, cls in classes.items():
        setattr(module, name, cls)
    monkeypatch.setitem(sys.modules, "deep_ep", module)


def test_deepep_v2_passes(monkeypatch):
    fake_deep_ep(monkeypatch, "2.1.0", ElasticBuffer=ElasticBufferV2, Buffer=BufferV1)  # v2 keeps the legacy Buffer too
    assert kernels.deepep_v2_missing(sys.modules["deep_ep"]) == []
    kernels.check_moe_comm_backend("deepep")


def test_deepep_v1_is_refused_in_one_line(monkeypatch):
    fake_deep_ep(monkeypatch, "1.0.0", Buffer=BufferV1)
    with pytest.raises(RuntimeError) as refused:
        kernels.check_moe_comm_backend("deepep")
    message = str(refused.value)
    assert "\n" not in message
    assert "deep_ep 1.0.0 lacks ElasticBuffer" in message and "make deepep DEEPEP_SRC=" in message


def test_deepep_v2_without_a_keyword_torchtitan_passes_is_refused(monkeypatch):
    class EarlyElasticBuffer(ElasticBufferV2):
        def dispatch(self, x, topk_idx=None, topk_weights=None, num_experts=None, num_max_tokens_per_rank=None,
                     num_sms=0, handle=None, do_expand=False):  # no do_cpu_sync
            pass

    fake_deep_ep(monkeypatch, "2.0.0.dev", ElasticBuffer=EarlyElasticBuffer)
    with pytest.raises(RuntimeError, match=r"lacks ElasticBuffer\.dispatch\(do_cpu_sync=\)"):
        kernels.check_moe_comm_backend("deepep")


def test_deepep_missing_or_unknown_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_ep", None)  # import of deep_ep fails as when not installed
    with pytest.raises(RuntimeError, match=r"needs DeepEP v2 \(deep_ep\), not installed here: .*make deepep"):
        kernels.check_moe_comm_backend("deepep")
    kernels.check_moe_comm_backend("standard")
    with pytest.raises(ValueError, match=r"expected standard\|deepep"):
        kernels.check_moe_comm_backend("alltoall")
