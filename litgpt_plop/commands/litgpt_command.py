"""``litgpt finetune --plugin plop``: LitGPT's own ``litgpt`` command reaching the plugin, extended from outside.

LitGPT 0.5 has no plugin mechanism: its console script (``litgpt = litgpt.__main__:main``) runs
``CLI(PARSER_DATA)`` on a fixed dict. ``litgpt_plop.commands.litgpt_hook`` (set up at interpreter start by
``litgpt_plop.pth``) calls ``extend`` right after ``litgpt.__main__`` has loaded, and ``extend`` wraps its ``main``.
The wrapper looks at the command line before anything is parsed, and:

- for any subcommand but ``finetune``/``finetune_lora``, or without ``--plugin`` (on the command line or as a
  ``plugin:`` key of a ``--config`` file), calls LitGPT's ``main`` untouched: the run is stock LitGPT, bit for bit;
- with ``--plugin``, runs ``litgpt-plop``'s ``main`` on the same arguments, so ``litgpt finetune --plugin plop ...``
  is ``litgpt-plop finetune --plugin plop ...`` (``--config`` files included);
- with ``-h``/``--help``, calls LitGPT's ``main`` with the two finetune entries showing both forms: every stock
  option with the default it has without ``--plugin``, plus ``--plugin`` and the method option groups;
- with an option only the plugin has (``--plop.*``, ...) but no ``--plugin``, says so in one line (exit status 2).

Before any of this it checks that the installed LitGPT is one the plugin was written for (its version within
litgpt-plop's declared range, and ``finetune``/``finetune_lora`` mapped to ``litgpt.finetune.lora.setup``);
otherwise stock LitGPT runs and one line on stderr says why the plugin is not active.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import sys
import typing
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

FINETUNE_COMMANDS = ("finetune", "finetune_lora")
DISTRIBUTION = "litgpt-plop"
HELP_FLAGS = ("-h", "--help")
# Options jsonargparse adds to every subcommand, beside the function's parameters.
JSONARGPARSE_OPTIONS = ("config", "print_config", "help")


def extend(module: ModuleType) -> None:
    """Wrap ``litgpt.__main__.main`` (called by ``litgpt_plop.commands.litgpt_hook`` once the module has loaded)."""
    original = module.main

    @functools.wraps(original)
    def main(*args: Any, **kwargs: Any) -> Any:
        return dispatch(module, functools.partial(original, *args, **kwargs), sys.argv[1:])

    module.main = main


def dispatch(module: ModuleType, stock_main: Callable[[], Any], argv: list[str]) -> Any:
    """Run one ``litgpt`` command line: stock, the plugin, or the combined help (see the module docstring)."""
    try:
        action = choose(module, stock_main, argv)
    except Exception as error:  # noqa: BLE001 - a fault of the plugin must never stop stock LitGPT
        print(f"litgpt-plop: `litgpt --plugin` is not active ({type(error).__name__}: {error})", file=sys.stderr)
        action = None
    return stock_main() if action is None else action()


def choose(module: ModuleType, stock_main: Callable[[], Any], argv: list[str]) -> Callable[[], Any] | None:
    """What runs this command line: ``None`` for stock LitGPT, else the call that replaces it. Everything that can
    fail (checks, imports of the plugin) happens here, before anything runs."""
    if not argv or argv[0] not in FINETUNE_COMMANDS:
        return None
    command, options = argv[0], argv[1:]
    reason = why_inactive(module)
    if reason is not None:
        print(f"litgpt-plop: `litgpt {command} --plugin` is not active: {reason}; running stock LitGPT", file=sys.stderr)
        return None
    if any(flag in options for flag in HELP_FLAGS):
        return functools.partial(with_finetune_entries, module, combined_help_function(), stock_main)
    if wants_plugin(options):
        from litgpt_plop.commands.cli import main as plop_main

        return plop_main
    orphans = plugin_only_options(options)
    if orphans:
        need = "needs" if len(orphans) == 1 else "need"
        print(
            f"litgpt {command}: {', '.join(orphans)} {need} --plugin (e.g. --plugin plop); without --plugin,"
            f" `litgpt {command}` is stock LitGPT",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return None


def why_inactive(module: ModuleType) -> str | None:
    """Why the plugin cannot extend this LitGPT's CLI safely, or ``None`` when it can."""
    version = importlib.metadata.version("litgpt")
    supported = supported_litgpt()
    if supported is not None and not supported.contains(version, prereleases=True):
        return f"litgpt {version} is outside the range litgpt-plop supports ({supported})"
    from litgpt.finetune.lora import setup as lora_setup

    parser_data = getattr(module, "PARSER_DATA", None)
    if not isinstance(parser_data, dict):
        return f"litgpt {version}'s CLI has no PARSER_DATA dict"
    unexpected = [name for name in FINETUNE_COMMANDS if parser_data.get(name) is not lora_setup]
    if unexpected:
        return f"litgpt {version}'s CLI does not map {' and '.join(unexpected)} to litgpt.finetune.lora.setup"
    return None


def supported_litgpt() -> Any:
    """The LitGPT versions litgpt-plop declares it works with (``packaging`` SpecifierSet), from its own metadata."""
    from packaging.requirements import Requirement

    for line in importlib.metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(line)
        if requirement.name == "litgpt" and requirement.marker is None:
            return requirement.specifier
    return None


def wants_plugin(options: list[str]) -> bool:
    """``--plugin`` on the command line, or a ``plugin:`` key in a ``--config`` file (or inline YAML)."""
    if any(option == "--plugin" or option.startswith("--plugin=") for option in options):
        return True
    return any(isinstance(config, dict) and "plugin" in config for config in given_configs(options))


def given_configs(options: list[str]) -> list[Any]:
    """The contents of every ``--config`` given: a file's YAML, or the value itself as YAML (jsonargparse takes
    both); ``None`` for one that cannot be read, which is left to jsonargparse to report."""
    import yaml

    values = []
    for index, option in enumerate(options):
        if option == "--config" and index + 1 < len(options):
            values.append(options[index + 1])
        elif option.startswith("--config="):
            values.append(option.split("=", 1)[1])
    configs = []
    for value in values:
        try:
            path = Path(value)
            text = path.read_text() if path.is_file() else value
            configs.append(yaml.safe_load(text))
        except (OSError, ValueError, yaml.YAMLError):
            configs.append(None)
    return configs


def plugin_only_options(options: list[str]) -> list[str]:
    """The options among ``options`` that only the plugin's finetune has (``--plop.num_kinds``, ...), as given.

    Only an option that stock LitGPT does not know leads to importing the plugin's ``setup``: a stock run, whose
    options are all LitGPT's, costs nothing more than the check of their names.
    """
    from litgpt.finetune.lora import setup as stock_setup

    known = {*inspect.signature(stock_setup).parameters, *JSONARGPARSE_OPTIONS}
    unknown = {option: option_name(option) for option in options if option.startswith("--")}
    unknown = {option: name for option, name in unknown.items() if name not in known}
    if not unknown:
        return []
    try:
        from litgpt_plop.commands.finetune import setup as plugin_setup
    except ImportError:
        return []  # stock LitGPT reports the unknown options itself
    plugin_only = set(inspect.signature(plugin_setup).parameters)
    return [option.split("=", 1)[0] for option, name in unknown.items() if name in plugin_only]


def option_name(option: str) -> str:
    """The parameter an option sets: ``--plop.num_kinds=2`` -> ``plop``, ``--candidate_kinds+`` -> ``candidate_kinds``."""
    return option[2:].split("=", 1)[0].split(".", 1)[0].rstrip("+")


def with_finetune_entries(module: ModuleType, function: Callable[..., Any], stock_main: Callable[[], Any]) -> Any:
    """Call LitGPT's ``main`` with ``finetune``/``finetune_lora`` mapped to ``function``, then put LitGPT's back."""
    parser_data = module.PARSER_DATA
    saved = {name: parser_data[name] for name in FINETUNE_COMMANDS}
    parser_data.update(dict.fromkeys(FINETUNE_COMMANDS, function))
    try:
        return stock_main()
    finally:
        parser_data.update(saved)


def combined_help_function() -> Callable[..., None]:
    """A function whose signature and docstring make jsonargparse print the help of both forms of the command.

    Its parameters are the plugin's ``setup``'s; where LitGPT's ``finetune_lora`` has another default (``out_dir``,
    the ``lora_*`` flags), the parameter defaults to ``None`` and its help gives both defaults. It is only ever
    shown: ``--help`` exits before a function is called.
    """
    from litgpt.finetune.lora import setup as stock_setup

    from litgpt_plop.commands.finetune import setup as plugin_setup

    stock = inspect.signature(stock_setup).parameters
    hints = typing.get_type_hints(plugin_setup)
    docs = parameter_docs(plugin_setup)
    parameters = []
    for name, parameter in inspect.signature(plugin_setup).parameters.items():
        annotation = hints.get(name, parameter.annotation)
        default = parameter.default
        if name == "plugin":
            annotation, default = str | None, None
            docs[name] = (
                "Unset: stock LitGPT ``finetune_lora`` runs, unchanged, with LitGPT's defaults (LoRA on query and value,"
                f" out_dir {stock['out_dir'].default}); the options marked 'Needs --plugin' are refused. Set:"
                f" litgpt-plop places the adapters, exactly as ``litgpt-plop finetune`` does. {docs.get(name, '')}"
            )
        elif name in stock and stock[name].default != default:
            ours = "unset" if default is None else default
            docs[name] = (
                f"{docs.get(name, '')} Default without --plugin: {stock[name].default} (LitGPT's); with --plugin: {ours}."
            )
            annotation, default = annotation | None if default is not None else annotation, None
        elif name not in stock:
            docs[name] = f"{docs.get(name, '')} Needs --plugin."
        parameters.append(parameter.replace(annotation=annotation, default=default))

    def finetune(**kwargs: Any) -> None:
        raise RuntimeError("litgpt-plop: this function only renders `litgpt finetune --help`; it is never run")

    finetune.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    summary = (
        "Finetune a model with LoRA: stock LitGPT (``litgpt finetune_lora``) without --plugin; with --plugin, the"
        " adapters placed by litgpt-plop (``litgpt-plop finetune``)."
    )
    arguments = "\n".join(f"    {name}: {doc.strip()}".replace("\n", "\n        ") for name, doc in docs.items())
    finetune.__doc__ = f"{summary}\n\nArguments:\n{arguments}\n"
    return finetune


def parameter_docs(function: Callable[..., Any]) -> dict[str, str]:
    """``{parameter: its help}`` from a Google-style docstring, one line each."""
    import docstring_parser

    parsed = docstring_parser.parse(function.__doc__ or "")
    return {p.arg_name: " ".join((p.description or "").split()) for p in parsed.params}
