"""benchmarks/alternating.py: the rounds' order and the medians the micro-benchmarks print."""

from benchmarks import alternating


def test_rounds_alternate_the_order_and_time_every_call():
  calls = []
  times = alternating.time_rounds({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
                                  rounds=3, steps=2)
  # Each round: one untimed call, then 2 timed ones, per name; the order reverses each round.
  assert ''.join(calls) == 'aaabbb' + 'bbbaaa' + 'aaabbb'
  assert {name: len(t) for name, t in times.items()} == {'a': 3, 'b': 3}
  assert all(t >= 0 for ts in times.values() for t in ts)


def test_report_returns_the_median_of_the_rounds(capsys):
  medians = alternating.report({'fast': [0.003, 0.001, 0.002], 'slow': [0.010, 0.030]})
  assert medians == {'fast': 0.002, 'slow': 0.020}
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].split()[:3] == ['fast', '2.00', 'ms'] and '3.0, 1.0, 2.0' in printed[0]
