"""Activation shards (docs/design.md section 2): the format, dataset.json, a synthetic writer, and the loader.

The package: format.py (dataset.json as DatasetInfo, URLs, one sample's encoding and checks, int8
quantization), shards.py (ShardWriter, read_shard, verify_shards: on webdataset's TarWriter and tar
iterator), loader.py (the schedule, ActivationLoader, to_training, reshard_loader_states), workers.py (the
loader's worker processes), synthetic.py (write_synthetic_dataset, for tests and benchmarks).

Format
------
A dataset is a folder or URL prefix holding `dataset.json` and WebDataset shards NAME-000000.tar, ...
Each tar member `<key>.safetensors` is one sample of T tokens (safetensors keeps bf16):

    x          [T, N, D]  bfloat16 | float16 | int8   raw residual stream at each MLP block's input
    y          [T, N, D]  same dtype                  raw MLP block output as added to the residual stream
    x_scale    [T, N]     float32 (int8 only)         per-row scale: x ~ x_int8 * x_scale[..., None]
    y_scale    [T, N]     float32 (int8 only)
    token_ids  [T]        int64                       the token each row belongs to (vocabulary ids)
    doc        [T]        int64                       provenance: source document index
    ctx        [T]        int64                       provenance: context index (contexts fed to the model, in order)
    pos        [T]        int64                       provenance: position of the token in its context

Tokens were shuffled across documents before they were written, so a sample's rows are unrelated
tokens. Activations are stored raw; `DatasetInfo.scale_x/scale_y` normalize them, so that
E||s_x[l] x_l|| = sqrt(D): the loader does it (normalize=True, float32 batches), or the training
step does it on its device from raw batches (normalize=False, then `to_training`).

URLs: a local folder, `http(s)://...`, `gs://...` or anything WebDataset's `gopen` opens, or a
`pipe:` command with `{}` where the file name goes, e.g. `pipe:aws s3 cp s3://bucket/acts/{} -`.

Loader order (deterministic given seed, dp_size, num_workers, shuffle_buffer)
-----------------------------------------------------------------------------
1. Epoch e permutes the shards with seed+e; data-parallel rank r takes every dp_size-th shard, and
   worker w of that rank every num_workers-th of those (0 workers reads local files in-process, in the
   same order as 1 worker).
2. The rank's sample stream interleaves its workers round-robin, one sample each. Every sample declared
   in dataset.json is a "slot" of this stream, present or not; a skipped bad sample leaves an empty slot,
   so the schedule never depends on the data.
3. Consecutive windows of ceil(shuffle_buffer / T) slots are loaded, their tokens permuted (seeded by
   seed, epoch, rank and window), and cut into batches of batch_tokens; a batch may span windows and
   epochs. The position is therefore (epoch, window, tokens taken from the window, and the window's
   empty slots): `state_dict()` records it, and a restarted loader re-reads only that window.
   Within a batch, rows are grouped by the sample they came from (a cheaper gather; the set is random).
Across ranks and workers every token of the split is delivered exactly once per epoch. Ranks may hold
different token counts per epoch (whole shards are split); with epochs=None (the default) the stream
continues into the next epoch, so that never starves a rank.

Another layout: `reshard_loader_states(states of every old rank, new_dp_size, dataset)` lists what
the old ranks had not yet delivered of the current epoch (whole sample ranges, and for a partly served
window its samples less the rows already delivered) and cuts it into new_dp_size contiguous parts; each
new rank reads its part as that epoch (its own windows and shuffle), then follows the new layout's
schedule. `load_state_dict` does the same for one rank when num_workers or shuffle_buffer changed.

Checks: every sample's shape, dtype and finiteness (int8: its scales'), each shard's sample count and
(when read from its start) sha256 against dataset.json; `verify_shards` checks every local shard's
sha256 up front. A bad sample raises DatasetError naming the shard and what is wrong, or with
on_error="skip" leaves an empty slot, counted in `ActivationLoader.skipped` and logged. Local shards
are read in place (mapped; loader.py and shards.py say how samples reach the training process); a
worker that dies or a URL that stalls for `timeout` seconds is an error, never a hang; workers die
with their parent.
"""
from .format import (DATASET_JSON, DTYPES, FORMAT, QUANTIZED_DTYPES, SAMPLE_EXT, SCALE_TOKENS,  # noqa: F401
                     STORAGE_DTYPES, DatasetError, DatasetInfo, Sample, SampleError, all_finite,
                     check_dataset_matches, decode_sample, encode_sample, is_url, join_url, normalization_scales,
                     open_url, quantize_rows, seed_mix)
from .loader import (ActivationLoader, Batch, Schedule, epoch_shards, loader_from_config,  # noqa: F401
                     remaining_pieces, reshard_loader_states, rr_consumed, to_training)
from .shards import EmptySlot, ShardWriter, read_samples, read_shard, shard_name, verify_shards  # noqa: F401
from .synthetic import write_synthetic_dataset  # noqa: F401
