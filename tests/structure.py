"""How ppo.py reads, measured as reviews/STRUCTURE-2026-12-04.md measures it (a script, not a test).

    python tests/structure.py                      # sections, PPOTrainer, the step path, its modes
    python tests/structure.py --modes              # ... and every mode switch on the step path
    python tests/structure.py --same-ast OLD NEW   # prove a move: every definition's AST unchanged

The step path is PPOTrainer.train_loop and PPOStep.train_step plus every function they reach through
the static call graph (module functions, the trainer's methods, and the methods of the objects the step
holds: the backend, the stop request, the timer, the rows and the models). A mode switch is an `if`
or a ternary whose test reads a setting (`cfg.NAME`), a value a setting decides (a mode string, an
optional tensor or argument), the number of processes, the backend or the device, or what a model or
tokenizer supports; the other tests depend on data. On 3d05d44 this counts 68, as the review did.
"""
import ast
import collections
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"^# (\d+)\. (.*)$")

# Receivers whose method calls resolve to one class of ppo.py (the objects a step holds).
RECEIVERS = {"backend": ("Backend", "DeepSpeedBackend"), "stop_request": ("StopRequest",),
             "timer": ("Timer",), "rows": ("Rows",), "rollout": ("Rows",), "batch": ("Rows",),
             "experience": ("Rows", "Experience"), "first_pass": ("PolicyPass",),
             "old": ("PolicyPass",), "files": ("RunFiles",)}
CALLABLE_ATTRIBUTES = {"model": "PolicyAndCritic.forward", "ref": "Reference.forward",
                       "timer": "Timer.__call__"}
BASES = {"PPOTrainer": ("PPOStep",)}            # PPOTrainer = PPOStep + the training loop
TRAINER = ("PPOStep", "PPOTrainer")
# Names of values that a setting decides, when a test reads them (the review's "a setting carried
# as a value", a capability, the processes, the device).
MODE_WORDS = re.compile(
    r"\bcfg\.|\bself\.cfg\b|\bworld\b|\bscaler\b|\bdevice\.type\b|\bkeep_logits\b|\bmode\b|"
    r"\bestimator\b|\bkind\b|\brule\b|\bdo_sample\b|\bwith_entropy\b|^critic$|\bcritic is\b|"
    r"\bvalues is\b|\bfirst_pass is\b|\bschedule is\b|\bmoments is\b|\bsums is\b|\bin sums\b|"
    r"\bcounts\[0\] == 0|\bdual_clip\b|\bbuffer\b|\bchat_template\b|\breward_reads_policy_ids\b|"
    r"\badds_bos\b|\bmin_p\b|\blimit is\b|^not limit$|\boffload\b|\brequires_grad\b|\bscore\b|"
    r"\bshift_mean\b|\bempty is\b|\btimer is\b|^plan$|\bself\.plan$|\badapters_off\b|"
    r"\bself\.critic\b|^t is None$|^pieces\[0\] is None$|\bhas_reference\b|\breference_model\b|\bshared\b|\bwarmup\b")


def is_mode_operand(operand) -> bool:
    """A comparison of a value with a setting's threshold (`kl > cfg.TARGET_KL`) is a data test;
    the number of processes (`world > 1`) is a mode."""
    text = ast.unparse(operand)
    if (isinstance(operand, ast.Compare) and
            any(isinstance(op, (ast.Lt, ast.Gt, ast.LtE, ast.GtE)) for op in operand.ops)):
        return "world" in text
    return bool(MODE_WORDS.search(text))


def sections(lines):
    """[(number, title, first line, last line)] of the `# N. title` banners."""
    found = [(int(m.group(1)), m.group(2), i + 1) for i, line in enumerate(lines)
             if (m := SECTION.match(line))]
    out = []
    for k, (number, title, start) in enumerate(found):
        end = found[k + 1][2] - 3 if k + 1 < len(found) else len(lines)
        out.append((number, title, start - 1, end))
    return out


def index(tree):
    """{qualified name: node} of module functions, classes and their methods."""
    table = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            table[node.name] = node
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    table[f"{node.name}.{item.name}"] = item
    return table


def callees(node, table, owner):
    """(qualified name, line of the call) of what a function can call, statically."""
    methods = collections.defaultdict(list)
    for name in table:
        if "." in name:
            methods[name.split(".")[1]].append(name)
    annotations = {id(n) for arg in ast.walk(node) if isinstance(arg, (ast.arg, ast.FunctionDef))
                   for a in (getattr(arg, "annotation", None), getattr(arg, "returns", None)) if a
                   for n in ast.walk(a)}
    for sub in ast.walk(node):
        if id(sub) in annotations:
            continue
        if isinstance(sub, ast.Name) and sub.id in table:
            target = table[sub.id]
            if isinstance(target, ast.ClassDef):
                for special in ("__init__", "__post_init__", "forward", "backward"):
                    if f"{sub.id}.{special}" in table:
                        yield f"{sub.id}.{special}", sub.lineno
            else:
                yield sub.id, sub.lineno
        if not isinstance(sub, ast.Attribute):
            continue
        receiver = sub.value
        receiver_name = (receiver.attr if isinstance(receiver, ast.Attribute) else
                         receiver.id if isinstance(receiver, ast.Name) else None)
        if isinstance(receiver, ast.Name) and receiver.id == "self" and owner:
            for cls in (owner, *BASES.get(owner, ())):       # the method, or the one it inherits
                if f"{cls}.{sub.attr}" in table:
                    yield f"{cls}.{sub.attr}", sub.lineno
                    break
        elif receiver_name in RECEIVERS:
            for cls in RECEIVERS[receiver_name]:
                if f"{cls}.{sub.attr}" in table:
                    yield f"{cls}.{sub.attr}", sub.lineno
    for sub in ast.walk(node):           # calls of the objects themselves: self.model(...), timer(...)
        if not isinstance(sub, ast.Call):
            continue
        func = sub.func
        if isinstance(func, ast.Name) and func.id in CALLABLE_ATTRIBUTES:
            yield CALLABLE_ATTRIBUTES[func.id], sub.lineno
        if (owner in TRAINER and isinstance(func, ast.Attribute) and
                isinstance(func.value, ast.Name) and func.value.id == "self" and
                func.attr in CALLABLE_ATTRIBUTES):
            yield CALLABLE_ATTRIBUTES[func.attr], sub.lineno


def step_path(table):
    """{qualified name: [(caller, line of the call)]} reachable from train_loop and train_step."""
    step = "PPOStep" if "PPOStep" in table else "PPOTrainer"      # one class before the split
    roots = ["PPOTrainer.train_loop", f"{step}.train_step"]
    reached = {root: [] for root in roots}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name == "PPOTrainer.after_step":       # the loop's bookkeeping, not the step
            continue
        owner = name.split(".")[0] if "." in name else None
        for callee, line in callees(table[name], table, owner):
            if callee == name:
                continue
            if callee not in reached:
                reached[callee] = []
                todo.append(callee)
            reached[callee].append((name, line))
    reached.pop("PPOTrainer.after_step", None)
    return reached


def mode_switches(node, source_lines):
    """[(line, test source)] of the `if` / ternary tests of a function that decide a mode."""
    found = []
    for sub in ast.walk(node):
        if isinstance(sub, (ast.If, ast.IfExp)):
            operands = sub.test.values if isinstance(sub.test, ast.BoolOp) else [sub.test]
            if any(is_mode_operand(o.operand if isinstance(o, ast.UnaryOp) else o)
                   for o in operands):
                found.append((sub.lineno, ast.unparse(sub.test)))
    return found


def report(path: Path, show_modes: bool) -> None:
    src = path.read_text(encoding="utf-8")
    lines, tree = src.splitlines(), ast.parse(src)
    print(f"{path.name}: {len(lines)} lines")
    print("\nsections:")
    for number, title, start, end in sections(lines):
        print(f"  {number:>2} {title[:70]:<70} {start:>5}-{end:<5} {end - start + 1:>5} lines")
    table = index(tree)
    print()
    for name in (n for n in TRAINER if n in table):
        trainer = table[name]
        methods = [n for n in trainer.body if isinstance(n, ast.FunctionDef)]
        print(f"{name}: {trainer.end_lineno - trainer.lineno + 1} lines, {len(methods)} methods")
    path_ = step_path(table)
    nodes = {name: table[name] for name in path_}
    code_lines = sum(n.end_lineno - n.lineno + 1 for n in nodes.values())
    print(f"step path: {len(nodes)} functions, {code_lines} lines of code")
    edges = [(abs(table[callee].lineno - line), caller, callee, line)
             for callee, calls in path_.items() for caller, line in calls]
    edges.sort(reverse=True)
    print("longest jumps from a call on the step path to the definition it calls:")
    for distance, caller, callee, line in edges[:5]:
        print(f"  {distance:>5} lines: {caller} (line {line}) -> {callee} (line {table[callee].lineno})")
    commit = table.get("PPOStep.commit_step") or table["PPOTrainer.commit_step"]
    first_math = next(start for number, title, start, end in sections(lines) if number == 3)
    constants = next(start for number, title, start, end in sections(lines) if number == 2)
    print(f"the algorithm in one stretch: constants (line {constants}) to the end of the step "
          f"(commit_step, line {commit.end_lineno}): {commit.end_lineno - constants + 1} "
          f"lines; from the math (line {first_math}): {commit.end_lineno - first_math + 1} lines")
    switches = {name: mode_switches(node, lines) for name, node in nodes.items()}
    total = sum(len(v) for v in switches.values())
    print(f"mode switches on the step path: {total}")
    if show_modes:
        for name in sorted(switches, key=lambda n: table[n].lineno):
            for line, text in switches[name]:
                print(f"  {line:>5} {name}: {text[:80]}")


def same_ast(old: Path, new: Path) -> int:
    """Every definition (and method) has the same AST in both; so has the multiset of top-level
    statements, a `from __future__ import annotations` aside. Methods may be reordered."""
    def canonical(node):
        if isinstance(node, ast.ClassDef):
            node = ast.ClassDef(**{**vars(node), "body": sorted(node.body, key=ast.dump)})
        return ast.dump(node)

    def definitions(tree):
        out = {}
        for node in tree.body:
            name = getattr(node, "name", None) or (
                ast.unparse(node.targets[0]) if isinstance(node, ast.Assign) else None)
            if name:
                out[name] = canonical(node)
            for item in getattr(node, "body", []) if isinstance(node, ast.ClassDef) else []:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = ast.dump(item)
        return out

    def statements(tree):
        return collections.Counter(canonical(n) for n in tree.body if not (
            isinstance(n, ast.ImportFrom) and n.module == "__future__"))

    a, b = (ast.parse(p.read_text(encoding="utf-8")) for p in (old, new))
    da, db = definitions(a), definitions(b)
    differ = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
    same = statements(a) == statements(b)
    print(f"{len(da)} definitions and methods in {old}, {len(db)} in {new}; differing: "
          f"{', '.join(differ) or 'none'}; the top-level statements are the same multiset: {same}")
    return 1 if differ or not same else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--same-ast"]:
        sys.exit(same_ast(Path(args[1]), Path(args[2])))
    report(Path(args[0]) if args and not args[0].startswith("--") else ROOT / "ppo.py",
           "--modes" in args)
