"""LLVM intrinsics numba does not expose, for the kernels: ctpop, cttz and a prefetch.

numba has no popcount or count-trailing-zeros builtin and ``np.bitwise_count`` is not supported inside
``@njit``; these intrinsics compile to single instructions (``popcnt``/``tzcnt``, ``vpopcntq`` when
vectorised) on the host CPU. ``prefetch_write`` asks for an array element's cache line ahead of a
read-modify-write: kernels that hop around a bitmap larger than the caches use it a few iterations ahead.
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


def _prefetch_write(typingctx: Any, arr: Any, index: Any) -> Any:
    """Prefetch the cache line of ``arr[index]`` for writing (a hint: never faults, no bounds check)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(index, types.Integer):
        return None
    sig = types.void(arr, index)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # rw = 1 (write), locality = 3 (keep in all levels), cache type = 1 (data)
        builder.call(
            fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)]
        )
        return context.get_dummy_value()

    return sig, codegen


popcount64 = cast(Callable[[Any], Any], intrinsic(_popcount64))
ctz64 = cast(Callable[[Any], Any], intrinsic(_ctz64))
prefetch_write = cast(Callable[[Any, Any], None], intrinsic(_prefetch_write))
