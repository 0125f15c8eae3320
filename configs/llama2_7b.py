"""Llama-2-7B for plans and long-context runs: configs/llama.py's preset "llama2_7b".

  python main.py --mode plan --config configs/llama2_7b.py --config.plan.devices=8 \\
      --config.curriculum.l_max=L [--config.plan.memory_budget_gib=80]
"""
from configs import llama


def get_config():
    return llama.get_config("llama2_7b")
