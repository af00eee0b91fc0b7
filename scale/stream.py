"""Where train.py's images come from: decoded once at start-up (in memory, or into an --image-cache file), or, with
--stream, decoded per batch from their files or tar shard members, so memory stays flat and step 1 comes without
a decoding pass over the whole set.

    python train.py --data "shards/{000000..000099}.tar" --stream --workers 4 ...   # tar shards, decoded per batch
    python train.py --data train.jsonl --stream ...                                  # image files, the same way

open_images(cfg, records, size, master, world) gives (records, images) for both: `images[indices]` is uint8
(n, 3, S, S) either way, so train.py's step (data.packing's samples and batches, global_batch's order by seed and
step) is one code path, and --resume continues exactly: a step's samples follow from (seed, step) alone, so the
position in the stream is the step that last.pt records. StreamedImages reads a tar member at the byte span the
record list found (data/records.py reads shards header by header, skipping image bytes), in this process or in a
Pool of --workers processes per micro-batch. The same decoder as load_images, so the batches are the in-memory
path's, bit for bit (tests/test_stream.py). Not with --image-cache or --feature-cache (both decode every image
up front). An image that cannot be decoded when its batch comes is a black image and a warning: the in-memory
path drops such records before training, a stream cannot without decoding everything first.
"""
import sys
from multiprocessing import Pool

import torch

from data.images import _to_tensor, _try_load
from utils import UserError, register


class StreamedImages:
    """Indexable like load_images' uint8 (N, 3, S, S) tensor; decodes what is asked for, when it is asked for."""

    def __init__(self, records, size, workers=0):
        self.jobs = [(r.image, size, r.image_span) for r in records]
        self.ids = [r.id for r in records]
        self.size, self.workers, self.pool, self.bad = size, workers, None, 0
        self.shape = (len(self.jobs), 3, size, size)

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        index = index.tolist() if torch.is_tensor(index) else list(index)
        jobs = [self.jobs[i] for i in index]
        if self.workers > 0 and len(jobs) > 1:
            if self.pool is None:  # started at the first batch, after the model and data are built
                self.pool = Pool(self.workers)
            results = self.pool.map(_try_load, jobs, chunksize=max(1, len(jobs) // (2 * self.workers)))
        else:
            results = map(_try_load, jobs)
        out = torch.zeros((len(jobs), 3, self.size, self.size), dtype=torch.uint8)
        for j, (i, res) in enumerate(zip(index, results)):
            if isinstance(res, bytes):
                out[j] = _to_tensor(res, self.size)
            else:
                self.bad += 1
                print(f"warning: --stream: record {self.ids[i]}: {res[0]} ({res[1]}); a black image instead "
                      f"({self.bad} so far)", file=sys.stderr)
        return out

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None

    def __del__(self):
        self.close()


@register("stream")
def stream_images(cfg, records, size, master=True, world=1):
    """(records, StreamedImages) for train.py --stream (train.open_images)."""
    if cfg.image_cache or cfg.feature_cache:
        raise UserError("--stream decodes per batch: --image-cache and --feature-cache decode every image up "
                        "front; give one or the other")
    return list(records), StreamedImages(records, size, cfg.workers)
