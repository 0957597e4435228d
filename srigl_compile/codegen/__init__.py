"""The compile side: kernel definitions, schedule rules, tuning, builds, and the backends that own them.

This is the only package that imports TVM's compiler (lazily: when a kernel is built, by ``lower()``), never
``import srigl_compile``; this ``__init__`` imports nothing. What a lowered model needs at run time (operators,
handles, the registry, kernel loading) is in ``srigl_compile.runtime``, which never imports this package.

    target.py        parse_target / resolve_target / lowering_config: "llvm", "cuda", "cuda:sm_90", a dict or a
                     config -> the backend and its checked config; unknown targets are UnsupportedTargetError
    backends/        one Backend per target kind (dtypes, tuning, conv route, build); BACKENDS picks it
    _tvm_compat.py   import_tvm(): TVM 0.27 compiler namespaces, TVM_NUM_THREADS set before first use
    cpu_target.py    host_llvm_target(): {"kind": "llvm", "mcpu": <detected>, "num-cores": n}; llvm dict checks
  CPU kernels:
    kernels.py       TE definitions: row layout (small batch), col layout (large batch), pack (x -> col tiles),
                     offset layout (direct convolution on the padded input)
    rules.py         RowRule / ColRule / PackRule / OffsetRule: apply(func, target, params) -> Schedule | None
    tuning.py        select_params (records on disk), compile_kernels / compile_offset_kernel (cached per process)
  CUDA kernels:
    cuda_kernels.py  definitions per regime: decode (TE), col (TE), expand (TIR); CUDA C; nvcc fatbins
    cuda_rules.py    DecodeRule / ColRule: apply(func, params) -> Schedule | None, variant spaces
    cuda_records.py  default variants, schedule_all, GPU-measured records, the cost model's dispatch
"""
