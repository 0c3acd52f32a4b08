"""The teacher-logit cache: build, resume, inspect, verify and read a Zarr v3 store.

``muscle/CACHE_FORMAT.md`` is the normative description of the store (formats 1 and 2); this
package is one implementation of it. In short::

    <cache>/                      group, attrs["muscle_cache"]: format, data config, fingerprints
      stream/input_ids  (N,)      int32   every example's tokens, concatenated
      stream/labels     (N,)      int32   next-token labels, -100 where not a target
      stream/offsets    (E+1,)    int64   example e is tokens [offsets[e], offsets[e+1])
      stream/split      (E,)      uint8   index into attrs splits (train, validation)
      stream/example_id (E,)      string  JSON of the task's example id
      teachers/<name>/            group, attrs["muscle_teacher"]: provenance, complete
        ids           (N, K)      uintX   top-K token ids, descending logit
        logprobs      (N, K)      float16 log-probs at T=1 of those ids
        lse           (N, nT)     float32 logsumexp(z / T) for each cached T
        label_logprob (N,)        float32 log p(label) at T=1, NaN where label == -100
        tail_ids      (N, M)      uintX   format 2: M draws from the tail at T_r
        tail_logprobs (N, M)      float16 format 2: log-probs at T=1 of those draws
        negent        (N, nT)     float32 format 2: sum_j p_T log p_T for each cached T
        done          (n_chunks,) uint8   1 = that chunk of every array above is durable

One module per concern:

    schema.py   the arrays of each format, declared once; CacheConfig; format dispatch
    store.py    opening a cache: attributes, teachers, provenance, reads naming a bad chunk
    stream.py   the token stream: made from encoded examples, written, read
    compute.py  a teacher's forward pass over one unit and the values it stores
    write.py    committing to disk: root + stream, teacher group, one unit, completion
    decide.py   what a build does to the cache on disk: refusals, create/resume/skip, discard, locks
    build.py    build_cache: the teacher's build end to end, ranks, resume
    read.py     CacheReader, the trainer's batches
    verify.py   verify_cache
    inspect.py  inspect_cache / render_inspect
"""

from muscle.teacher_cache.build import BuildResult, build_cache, rank_units
from muscle.teacher_cache.compute import (
    UnitResult,
    _plan_batches,
    _unit_examples,
    compute_unit,
    forward_logits,
)
from muscle.teacher_cache.decide import check_compatible
from muscle.teacher_cache.inspect import inspect_cache, render_inspect, top_k_mass
from muscle.teacher_cache.read import CacheReader
from muscle.teacher_cache.schema import (
    FORMAT_VERSION,
    SCHEMAS,
    CacheConfig,
    ids_dtype_for,
    schema_for,
)
from muscle.teacher_cache.store import (
    cache_fingerprint,
    cache_teacher_spec,
    check_teacher_provenance,
    list_teachers,
    read_meta,
    read_teacher_meta,
    resolve_cache_config,
    teacher_provenance,
)
from muscle.teacher_cache.stream import StreamData, make_stream, read_stream
from muscle.teacher_cache.verify import VerifyReport, verify_cache
from muscle.teacher_cache.write import _create_teacher, _write_unit
from muscle.topk import stored_logprobs_at  # its home is beside logprobs_at; kept here too

__all__ = [
    "FORMAT_VERSION",
    "SCHEMAS",
    "BuildResult",
    "CacheConfig",
    "CacheReader",
    "StreamData",
    "UnitResult",
    "VerifyReport",
    "build_cache",
    "cache_fingerprint",
    "cache_teacher_spec",
    "check_compatible",
    "check_teacher_provenance",
    "compute_unit",
    "forward_logits",
    "ids_dtype_for",
    "inspect_cache",
    "list_teachers",
    "make_stream",
    "rank_units",
    "read_meta",
    "read_stream",
    "read_teacher_meta",
    "render_inspect",
    "resolve_cache_config",
    "schema_for",
    "stored_logprobs_at",
    "teacher_provenance",
    "top_k_mass",
    "verify_cache",
    # benchmarks/bench_cache.py times the writer's steps one by one
    "_create_teacher",
    "_plan_batches",
    "_unit_examples",
    "_write_unit",
]
