"""Bit-counting primitives for numba kernels: LLVM's ctpop and cttz.

numba has no popcount or count-trailing-zeros builtin and ``np.bitwise_count`` is not supported inside
``@njit``; these intrinsics compile to single instructions (``popcnt``/``tzcnt``, ``vpopcntq`` when
vectorised) on the host CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _popcount64(typingctx: Any, x: Any) -> Any:
    """Number of set bits of a uint64."""
    if x != types.uint64:
        return None
    sig = types.uint64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.ctpop.i64")
        return builder.call(fn, [args[0]])

    return sig, codegen


def _ctz64(typingctx: Any, x: Any) -> Any:
    """Index of the lowest set bit of a uint64 (64 for 0)."""
    if x != types.uint64:
        return None
    sig = types.uint64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(1)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])

    return sig, codegen


popcount64 = cast(Callable[[Any], Any], intrinsic(_popcount64))
ctz64 = cast(Callable[[Any], Any], intrinsic(_ctz64))
