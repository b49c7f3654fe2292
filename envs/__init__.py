"""Simulated serving environments for training and evaluating the morph controller.

Importing the package registers ``MorphServe-v0`` with gymnasium
(``gymnasium.make("MorphServe-v0", trace=..., windows=...)``).
"""

from gymnasium.envs.registration import register

register(id="MorphServe-v0", entry_point="envs.morph_env:MorphEnv")
