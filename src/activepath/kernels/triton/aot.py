# the Triton kernels, compiled ahead of time for a GPU (no GPU needed)
"""Ahead-of-time compilation of every Triton MoE kernel, for checks a CPU interpreter cannot make."""

from __future__ import annotations

from types import ModuleType

from activepath.kernels.triton.launch import _ACTIVATIONS, jit_kernels


def compile_kernels(arch: int = 90) -> dict[str, str]:
    """Compile every kernel, in representative variants, for NVIDIA ``sm_{arch}``; no GPU is
    needed (triton ships the compiler and ptxas). Returns variant → PTX. Catches what the CPU
    interpreter cannot: compile-time rules (constexpr globals, types) and whether the bf16
    GEMMs use tensor cores. Needs triton imported in compiled mode (TRITON_INTERPRET unset)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = jit_kernels()
    target = GPUTarget("cuda", arch, 32)
    ptx: dict[str, str] = {}
    variants = (("silu", "bf16", False), ("gelu", "fp32", True), ("gelu_tanh", "fp16", False),
                ("clamped_swiglu", "bf16", True))  # fmt: skip
    for act, dtype, bias in variants:
        ptrs = {"x_ptr": f"*{dtype}", "tok_ptr": "*i64", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                "h_ptr": f"*{dtype}", "counts_ptr": "*i64"}  # fmt: skip
        flags = {"ACT": _ACTIVATIONS[act], "HAS_BIAS": bias, "IEEE": dtype == "fp32", "UPCAST": False,
                 "E_POW2": 128, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}  # fmt: skip
        signature = {**ptrs, "E": "i32", "H": "i32", "I": "i32", "stride_xt": "i32", "stride_we": "i64",
                     "stride_wn": "i32", "stride_wk": "i32", "stride_be": "i32", "stride_hs": "i32", "GATE_STEP": "i32",
                     "UP_OFF": "i32", "alpha": "fp32", "limit": "fp32", **dict.fromkeys(flags, "constexpr")}  # fmt: skip
        ptx[f"gate_up_act {act} {dtype}"] = _compile(triton, ASTSource, kernels.gate_up_act, signature, flags, target)
        down_ptrs = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "order_ptr": "*i64",
                     "tw_ptr": "*fp32", "out_ptr": "*fp32", "counts_ptr": "*i64"}  # fmt: skip
        down_flags = {k: flags[k] for k in ("HAS_BIAS", "IEEE", "UPCAST", "E_POW2", "BLOCK_M", "BLOCK_N", "BLOCK_K")}
        down_sig = {**down_ptrs, "E": "i32", "I": "i32", "H": "i32", "stride_hs": "i32", "stride_we": "i64",
                    "stride_wn": "i32", "stride_wk": "i32", "stride_be": "i32", "stride_os": "i32",
                    **dict.fromkeys(down_flags, "constexpr")}  # fmt: skip
        ptx[f"down_weighted {act} {dtype}"] = _compile(triton, ASTSource, kernels.down_weighted, down_sig, down_flags, target)
        comb_sig = {"src_ptr": "*fp32", "pos_ptr": "*i64", "y_ptr": f"*{dtype}", "H": "i32", "K": "i32",
                    "stride_ss": "i32", "stride_yt": "i32", "K_POW2": "constexpr", "BLOCK_H": "constexpr"}  # fmt: skip
        ptx[f"combine {act} {dtype}"] = _compile(triton, ASTSource, kernels.combine, comb_sig, {"K_POW2": 8, "BLOCK_H": 128},
                                           target)  # fmt: skip
    plan_sig = {"ids_ptr": "*i64", **dict.fromkeys(("order_ptr", "token_ptr", "expert_ptr", "position_ptr", "counts_ptr"),
                "*i64"), "S": "i32", "E": "i32", "K": "i32", "RANK_PROGRAMS": "i32", "BLOCK_S": "constexpr",
                "BLOCK_E": "constexpr", "CHUNK": "constexpr"}  # fmt: skip
    ptx["plan_slots"] = _compile(triton, ASTSource, kernels.plan_slots, plan_sig,
                                 {"BLOCK_S": 16, "BLOCK_E": 16, "CHUNK": 128}, target)  # fmt: skip
    return ptx


def _compile(triton: ModuleType, ast_source: type, fn: object, signature: dict, constexprs: dict, target: object) -> str:
    source = ast_source(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": 4}).asm["ptx"]
