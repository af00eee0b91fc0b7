"""The experiment: PRIOR against NTP and its controls, the paper's other experiments, their reports. Importing this
package registers every lab plug-in (baselines/, benchmarks/, scale/), so its jobs run the core scripts with all of
them: `python -m experiments train ...` is train.py with the whole lab."""
import baselines  # noqa: F401 (plug-ins)
import benchmarks  # noqa: F401
import scale  # noqa: F401
import experiments.controls  # noqa: F401,E402 (anti_prior, prior_shuffled_tag: train.WEIGHTINGS)
