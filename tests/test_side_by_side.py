"""benchmarks/speed_side_by_side.py's pure parts: the peer's command line and the summary."""

from benchmarks import speed_side_by_side as sbs


def test_only_the_mae_peer_reads_images():
  mae = sbs.torch_command('py', 'mae', 3, 10, None, images='/d/train.npz')
  assert mae[mae.index('--images') + 1] == '/d/train.npz'
  assert '--images' not in sbs.torch_command('py', 'gpt', 3, 10, None, images='/d/train.npz')
  assert '--images' not in sbs.torch_command('py', 'mae', 3, 10, None)


def test_summary_ratios_are_ssl_jax_over_each_peer():
  runs = {'mae': {'ssl_jax': [{'examples_per_s': 600.0, 'step_time_s': 0.2},
                              {'examples_per_s': 620.0, 'step_time_s': 0.19}],
                  'pytorch': [{'examples_per_s': 750.0, 'step_time_s': 0.17}],
                  'pytorch_kept': [{'examples_per_s': 800.0, 'step_time_s': 0.16}]}}
  entry = sbs.summarize(runs)['mae']['examples_per_s']
  assert entry['ssl_jax'] == {'median': 610.0, 'min': 600.0, 'max': 620.0}
  assert entry['ratio'] == 610.0 / 750.0
  assert entry['ratio_pytorch_kept'] == 610.0 / 800.0
