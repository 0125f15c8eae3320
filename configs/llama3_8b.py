"""Llama-3-8B for plans and long-context runs: configs/llama.py's preset "llama3_8b".

  python main.py --mode plan --config configs/llama3_8b.py --config.plan.devices=8 \\
      --config.curriculum.l_max=L [--config.plan.memory_budget_gib=80]
"""
from configs import llama


def get_config():
    return llama.get_config("llama3_8b")
