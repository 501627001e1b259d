"""``--plugin race``: choose the placement by training the candidates side by side on the user's task.

The candidates (``candidates.py``) get the same trainable-parameter budget; successive halving (``schedule.py``)
decides when each round ends and how many survive it; every candidate's adapters live on the one base model and
are swapped in and out (``adapter_sets.py``); the rounds train and compare them (``runner.py``). The winner
continues to the end of the run in LitGPT's own loop.
"""

from litgpt_plop.race.args import RaceArgs
from litgpt_plop.race.schedule import RaceSchedule, race_schedule

__all__ = ["RaceArgs", "RaceSchedule", "race_schedule"]
