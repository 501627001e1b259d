"""``python -m litgpt_plop``: the ``litgpt-plop`` command (``litgpt_plop.commands.cli``)."""

from litgpt_plop.commands.cli import main

if __name__ == "__main__":
    main()
