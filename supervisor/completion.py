"""``supervisor completion bash|zsh|fish``: shell completion scripts, generated from the CLI's parser.

Generated, not written by hand: a command or flag added to the parser is
completed without anyone remembering to edit three scripts. Instance names
come from the running service through the hidden ``supervisor _names``, which
prints one name a line (and nothing, with exit 0, when no service answers);
the scripts pass on the ``-s/--socket`` and ``-f/--file`` already typed, so
the names are those of the service the command line will talk to.

Each script calls the program the user typed (``${COMP_WORDS[0]}`` and its
kin), so ``.venv/bin/supervisor`` completes against itself.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["SHELLS", "script"]

SHELLS = ("bash", "zsh", "fish")
SIGNALS = ("HUP", "INT", "QUIT", "TERM", "KILL", "USR1", "USR2", "STOP", "CONT", "WINCH")
_PATHS = {"file", "log_file", "pidfile", "socket"}


@dataclass
class _Command:
    name: str
    help: str
    flags: list[tuple[str, str]] = field(default_factory=list)  # (option, help) for flags and options
    paths: list[str] = field(default_factory=list)  # options whose value is a file
    values: list[str] = field(default_factory=list)  # options with a value we cannot guess
    choices: dict[str, list[str]] = field(default_factory=dict)  # options with a known set of values
    names: bool = False  # takes instance names
    first: list[str] = field(default_factory=list)  # the values of a first positional (signal, shell)


def _commands(parser: argparse.ArgumentParser, states: Sequence[str]) -> list[_Command]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {choice.dest: choice.help or "" for choice in sub._choices_actions}
    commands = []
    for name, command_parser in sub.choices.items():
        if name not in listed:
            continue  # hidden (`_names`)
        command = _Command(name, listed[name])
        for action in command_parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            if not action.option_strings:
                if action.dest == "names":
                    command.names = True
                elif action.dest == "signal":
                    command.first = list(SIGNALS)
                elif action.choices:
                    command.first = [str(c) for c in action.choices]
                continue
            takes_value = action.nargs != 0 and not (name == "logs" and action.option_strings == ["-f"])
            for option in action.option_strings:
                command.flags.append((option, (action.help or "").replace("%%", "%")))
                if not takes_value:
                    continue
                if action.dest in _PATHS:
                    command.paths.append(option)
                elif action.dest == "state":
                    command.choices[option] = list(states)
                elif action.choices:
                    command.choices[option] = [str(c) for c in action.choices]
                else:
                    command.values.append(option)
        commands.append(command)
    return commands


def script(shell: str, parser: argparse.ArgumentParser, states: Sequence[str]) -> str:
    commands = _commands(parser, states)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](commands)


def _words(items: Iterable[str]) -> str:
    return " ".join(shlex.quote(item) for item in items)


# -- bash ----------------------------------------------------------------------------------------

_BASH = r"""# bash completion for supervisor: eval "$(supervisor completion bash)" (e.g. in ~/.bashrc)
_supervisor_connection() {
    # The -s/--socket and -f/--file already on the line: the names come from that service.
    local i word
    _supervisor_conn=()
    for ((i = 2; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        case $word in
            -s|--socket|--file) _supervisor_conn+=("$word" "${COMP_WORDS[i+1]}") ;;
            -f) [[ $1 != logs ]] && _supervisor_conn+=("$word" "${COMP_WORDS[i+1]}") ;;
            --socket=*|--file=*) _supervisor_conn+=("$word") ;;
        esac
    done
}

_supervisor() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local prog=${COMP_WORDS[0]} cmd=${COMP_WORDS[1]}
    local flags="" paths="" values="" choices="" names=0 first=""
    COMPREPLY=()
    if ((COMP_CWORD == 1)); then
        COMPREPLY=($(compgen -W "@COMMANDS@" -- "$cur"))
        return 0
    fi
    case $cmd in
@CASES@
    esac
    local option spec
    for option in $paths; do
        [[ $prev == "$option" ]] && { COMPREPLY=($(compgen -f -- "$cur")); return 0; }
    done
    for option in $values; do
        [[ $prev == "$option" ]] && return 0
    done
    for spec in $choices; do
        if [[ $prev == "${spec%%=*}" ]]; then
            local listed=${spec#*=}
            COMPREPLY=($(compgen -W "${listed//,/ }" -- "$cur"))
            return 0
        fi
    done
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
        return 0
    fi
    local positional=0 i takes=" $paths $values ${choices//=/ } "
    for ((i = 2; i < COMP_CWORD; i++)); do
        [[ ${COMP_WORDS[i]} != -* && $takes != *" ${COMP_WORDS[i-1]} "* ]] && ((positional++))
    done
    if [[ -n $first && $positional == 0 ]]; then
        COMPREPLY=($(compgen -W "$first" -- "$cur"))
        return 0
    fi
    if ((names)); then
        _supervisor_connection "$cmd"
        local listed
        listed=$("$prog" _names "${_supervisor_conn[@]}" 2>/dev/null)
        COMPREPLY=($(compgen -W "$listed" -- "$cur"))
    fi
    return 0
}
complete -o default -F _supervisor supervisor
"""


def _bash(commands: list[_Command]) -> str:
    cases = []
    for c in commands:
        choices = " ".join(f"{o}={','.join(v)}" for o, v in c.choices.items())
        cases.append(
            f"        {c.name})\n"
            f"            flags={shlex.quote(' '.join(o for o, _ in c.flags))}\n"
            f"            paths={shlex.quote(' '.join(c.paths))} values={shlex.quote(' '.join(c.values))}\n"
            f"            choices={shlex.quote(choices)} names={int(c.names)}"
            f" first={shlex.quote(' '.join(c.first))} ;;"
        )
    listed = " ".join(c.name for c in commands)
    return _BASH.replace("@COMMANDS@", listed).replace("@CASES@", "\n".join(cases))


# -- zsh -----------------------------------------------------------------------------------------

_ZSH = r"""#compdef supervisor
# zsh completion for supervisor: eval "$(supervisor completion zsh)" after compinit,
# or save as _supervisor in a folder on $fpath.
_supervisor() {
    local prog=${words[1]} cmd=${words[2]} prev=${words[CURRENT-1]}
    local -a commands flags paths values choices first conn listed
    local names=0 word i
    if (( CURRENT == 2 )); then
        commands=(@COMMANDS@)
        _describe -t commands 'supervisor command' commands
        return
    fi
    case $cmd in
@CASES@
    esac
    if (( ${paths[(Ie)$prev]} )); then
        _files
        return
    fi
    (( ${values[(Ie)$prev]} )) && return
    for word in $choices; do
        if [[ $prev == ${word%%=*} ]]; then
            compadd -- ${(s:,:)${word#*=}}
            return
        fi
    done
    if [[ $PREFIX == -* ]]; then
        compadd -- $flags
        return
    fi
    local positional=0
    for (( i = 3; i < CURRENT; i++ )); do
        [[ ${words[i]} != -* ]] || continue
        (( ${paths[(Ie)${words[i-1]}]} + ${values[(Ie)${words[i-1]}]} )) && continue
        [[ -n ${(M)choices:#${words[i-1]}=*} ]] && continue
        (( positional++ ))
    done
    if (( ${#first} && positional == 0 )); then
        compadd -- $first
        return
    fi
    if (( names )); then
        for (( i = 3; i < CURRENT; i++ )); do
            case ${words[i]} in
                -s|--socket|--file) conn+=(${words[i]} ${words[i+1]}) ;;
                -f) [[ $cmd != logs ]] && conn+=(${words[i]} ${words[i+1]}) ;;
                --socket=*|--file=*) conn+=(${words[i]}) ;;
            esac
        done
        listed=(${(f)"$($prog _names $conn 2>/dev/null)"})
        compadd -- $listed
    fi
}
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    _supervisor "$@"
else
    compdef _supervisor supervisor
fi
"""


def _zsh(commands: list[_Command]) -> str:
    cases = []
    for c in commands:
        choices = [f"{o}={','.join(v)}" for o, v in c.choices.items()]
        cases.append(
            f"        {c.name})\n"
            f"            flags=({_words(o for o, _ in c.flags)})\n"
            f"            paths=({_words(c.paths)}) values=({_words(c.values)})\n"
            f"            choices=({_words(choices)}) names={int(c.names)} first=({_words(c.first)}) ;;"
        )
    # _describe splits "name:help" at the first unescaped colon.
    described = [f"{c.name}:" + c.help.replace("\\", "\\\\").replace(":", "\\:") for c in commands]
    return _ZSH.replace("@COMMANDS@", _words(described)).replace("@CASES@", "\n".join(cases))


# -- fish ----------------------------------------------------------------------------------------

_FISH = r"""# fish completion for supervisor: supervisor completion fish | source
# (or save as ~/.config/fish/completions/supervisor.fish)
function __supervisor_names
    set -l words (commandline -opc)
    set -l conn
    for i in (seq 3 (count $words))
        switch $words[$i]
            case -s --socket --file
                set -a conn $words[$i] $words[(math $i + 1)]
            case -f
                test "$words[2]" != logs; and set -a conn $words[$i] $words[(math $i + 1)]
            case '--socket=*' '--file=*'
                set -a conn $words[$i]
        end
    end
    $words[1] _names $conn 2>/dev/null
end

complete -c supervisor -f
"""


def _fish(commands: list[_Command]) -> str:
    lines = [_FISH]
    names = " ".join(c.name for c in commands)
    for c in commands:
        lines.append(
            f"complete -c supervisor -n 'not __fish_seen_subcommand_from {names}' "
            f"-a {shlex.quote(c.name)} -d {shlex.quote(c.help)}"
        )
    for c in commands:
        when = f"-n '__fish_seen_subcommand_from {c.name}'"
        for option, text in c.flags:
            spec = f"-l {option[2:]}" if option.startswith("--") else f"-s {option[1:]}"
            extra = ""
            if option in c.paths:
                extra = " -r -F"
            elif option in c.choices:
                extra = f" -x -a {shlex.quote(' '.join(c.choices[option]))}"
            elif option in c.values:
                extra = " -x"
            lines.append(f"complete -c supervisor {when} {spec}{extra} -d {shlex.quote(text)}")
        if c.first:
            lines.append(f"complete -c supervisor {when} -a {shlex.quote(' '.join(c.first))}")
        if c.names:
            lines.append(f"complete -c supervisor {when} -a '(__supervisor_names)'")
    return "\n".join(lines) + "\n"
