"""Peak memory of tokenising a text source: the old in-memory arrays against the token files.

  python benchmarks/token_memmap.py [--megabytes 100] [--workdir /tmp/token_memmap]

Builds (once, cached in --workdir) a TFDS array_record dataset of synthetic
~2 kB documents, about --megabytes of text, and a byte-level BPE of 4,096
trained on its first documents; then, each in a fresh process so that
`resource.getrusage(RUSAGE_SELF).ru_maxrss` is that variant's own peak:

  old   the pipeline before the token files: every document read into a list,
        split, encoded into one int32 array per document, concatenated,
        `np.save`d (the code of text_sources.py before the change, inlined);
  new   `text_sources.tokenized_text`: documents streamed from the source,
        encoded 1,024 at a time, appended to uint16 files.

It prints both peaks side by side (and the peak above the RSS after imports),
the tokens and seconds, then a JSON object as the last stdout line. The
figures scale with the corpus: at ~2B tokens (5% of C4) the old path needed
text + 2 x 4 bytes per token on top, the new one stays flat.

Linux keeps a process's ru_maxrss across exec, so a child starts with its
parent's RSS as its peak: the data is prepared in a child too, and this
parent stays small (numpy alone).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.getcwd())

DOC_CHARS = 2000  # C4's documents average ~2.2 kB.


def synthetic_documents(megabytes: float, seed: int = 0):
  """Documents of Zipf-distributed pseudo-words, ~DOC_CHARS characters each."""
  rng = np.random.default_rng(seed)
  letters = np.array(list('etaoinshrdlucmfwypvbgkjqxz'))
  words = [''.join(rng.choice(letters, n)) for n in rng.integers(1, 10, 20_000)]
  for _ in range(int(megabytes * 1e6 / DOC_CHARS)):
    picks = np.minimum(rng.zipf(1.3, DOC_CHARS // 5), len(words)) - 1
    yield ' '.join(words[i] for i in picks) + '.\n'


def prepare(workdir: str, megabytes: float) -> tuple[str, str]:
  """(tfds_dir, tokenizer.json path), built on the first run."""
  from ssl_jax.data import tfds_source, tokenizer  # pylint: disable=g-import-not-at-top

  tfds_dir = os.path.join(workdir, f'tfds_{megabytes:g}mb')
  tfds_source.write_text_dataset('ssl_jax_synthetic_text',
                                 lambda: synthetic_documents(megabytes), tfds_dir)
  path = os.path.join(workdir, 'bpe4096.json')
  if not os.path.exists(path):
    sample = [d for _, d in zip(range(500), synthetic_documents(1.0), strict=False)]
    tokenizer.train_tokenizer('bpe', sample, vocab_size=4096, objective='causal_lm').save(path)
  return tfds_dir, path


def old_tokenising(data) -> int:
  """The pre-file pipeline: documents in a list, one int32 array per document, concatenated."""
  from ssl_jax.data import text_sources, tokenizer  # pylint: disable=g-import-not-at-top

  documents = text_sources.read_documents(data.source, data.tfds_dir)
  train, val = text_sources.split_documents(documents, data.val_fraction)
  tok = tokenizer.load_tokenizer(data.tokenizer)
  total = 0
  for name, split in (('train', train), ('val', val)):
    pieces = []
    for start in range(0, len(split), 1024):
      for ids in tok.encode_batch(split[start:start + 1024]):
        pieces.append(np.asarray(ids, np.int32))
        pieces.append(np.array([tok.eot_id], np.int32))
    tokens = np.concatenate(pieces)
    np.save(os.path.join(data.workdir, f'old.{name}.npy'), tokens)
    total += len(tokens)
  return total


def new_tokenising(data) -> int:
  """text_sources.tokenized_text: streamed into uint16 files."""
  from ssl_jax.data import text_sources  # pylint: disable=g-import-not-at-top

  corpus = text_sources.tokenized_text(data, data.workdir)
  return len(corpus.train) + len(corpus.val)


def current_rss_kib() -> int:
  """This process's resident set size now (not its peak), in KiB."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))


def child(variant: str, tfds_dir: str, tokenizer_path: str, workdir: str) -> None:
  """One variant in this process; prints a JSON line with its peak RSS."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets.text  # noqa: F401  # pylint: disable=g-import-not-at-top

  from ssl_jax.data import text_sources  # noqa: F401  # pylint: disable=g-import-not-at-top

  data = ml_collections.ConfigDict(dict(
      source='tfds:ssl_jax_synthetic_text', tfds_dir=tfds_dir, tokenizer=tokenizer_path,
      objective='causal_lm', vocab_size=4096, seq_len=1024, val_fraction=0.0005))
  data.workdir = os.path.join(workdir, f'run_{variant}_{os.getpid()}')
  os.makedirs(data.workdir)
  start_rss = current_rss_kib()
  start = time.perf_counter()
  tokens = (old_tokenising if variant == 'old' else new_tokenising)(data)
  seconds = time.perf_counter() - start
  usage = resource.getrusage(resource.RUSAGE_SELF)
  peak = usage.ru_maxrss  # KiB on Linux
  shutil.rmtree(data.workdir)
  print(json.dumps({'variant': variant, 'tokens': tokens, 'seconds': round(seconds, 1),
                    'cpu_s': round(usage.ru_utime + usage.ru_stime, 1),
                    'peak_rss_mb': round(peak / 1024), 'above_imports_mb': round(
                        (peak - start_rss) / 1024)}))


def main() -> None:
  """Prepares the data, runs old and new in fresh processes, prints the table (or one child)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--megabytes', type=float, default=100.0)
  parser.add_argument('--workdir', default='/tmp/token_memmap_bench')
  parser.add_argument('--child', choices=('old', 'new', 'prepare'))
  parser.add_argument('--tfds_dir')
  parser.add_argument('--tokenizer')
  args = parser.parse_args()
  if args.child == 'prepare':
    print(json.dumps(prepare(args.workdir, args.megabytes)))
  elif args.child:
    child(args.child, args.tfds_dir, args.tokenizer, args.workdir)
  else:
    compare(args.workdir, args.megabytes)


def run_child(*args: str) -> dict:
  """The last stdout line of this script run with `args`, as JSON."""
  out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                       text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def compare(workdir: str, megabytes: float) -> None:
  """Prepares the data, then runs old and new, each in its own process."""
  os.makedirs(workdir, exist_ok=True)
  tfds_dir, tokenizer_path = run_child('--child', 'prepare', '--workdir', workdir,
                                       '--megabytes', str(megabytes))
  results = {variant: run_child('--child', variant, '--tfds_dir', tfds_dir, '--tokenizer',
                                tokenizer_path, '--workdir', workdir)
             for variant in ('old', 'new')}
  text_mb = megabytes
  print(f'{"variant":8} {"tokens":>12} {"wall s":>7} {"CPU s":>7} {"peak RSS MB":>12} '
        f'{"above imports":>14}')
  for r in results.values():
    print(f'{r["variant"]:8} {r["tokens"]:>12,} {r["seconds"]:>7} {r["cpu_s"]:>7} '
          f'{r["peak_rss_mb"]:>12} {r["above_imports_mb"]:>14}')
  print(f'(~{text_mb:g} MB of text, BPE 4,096: uint16 files)')
  print(json.dumps({'text_mb': text_mb, **{f'{k}_{m}': r[m] for k, r in results.items()
                                           for m in ('peak_rss_mb', 'above_imports_mb',
                                                     'seconds', 'cpu_s')}}))


if __name__ == '__main__':
  main()
