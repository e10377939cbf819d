"""Nothing but the study lifecycle writes a study's lifecycle columns.

``integrations/dicom/lifecycle.py`` owns every write of ``study.state``, ``version``,
``state_changed_at``, ``failure_reason`` and ``attempts`` (each state change a compare-and-set
with its audit record). This test reads the source (AST, not text search) of every module outside
``tests/`` and fails, naming file and line, on

* an assignment to one of those attributes of something that is a ``Study`` (annotated so, or
  bound from an expression that names ``Study`` or calls a function returning one), or a
  ``setattr`` of one;
* ``update(Study)...values(...)`` (or ``.values`` on ``update(Study.__table__)``) that sets one of
  them, by keyword or dict key, or through ``**`` (unknown columns count as a write);
* ``Study(...)`` constructed with one of them;
* SQL text (a string or f-string) with ``UPDATE study SET`` naming one of them, or whose columns
  are formatted in (unknown columns count as a write).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
OWNER = REPO / "integrations" / "dicom" / "lifecycle.py"
OWNED = frozenset({"state", "version", "state_changed_at", "failure_reason", "attempts"})
SKIP_DIRS = {"tests", ".venv", "node_modules", ".git", "build", "dist", "__pycache__"}
_UPDATE_STUDY = re.compile(r"\bUPDATE\s+study\s+SET\b(?P<rest>.*)", re.IGNORECASE | re.DOTALL)
_OWNED_COLUMN = re.compile(r"\b(" + "|".join(sorted(OWNED)) + r")\s*=", re.IGNORECASE)


def _sources() -> Iterator[Path]:
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or any(p.endswith(".egg-info") for p in rel.parts):
            continue
        yield path


def _mentions_study(node: ast.AST, study_functions: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and (sub.id == "Study" or sub.id in study_functions):
            return True
        if isinstance(sub, ast.Attribute) and sub.attr in study_functions:
            return True
    return False


def _is_study_annotation(node: ast.AST | None) -> bool:
    return node is not None and any(isinstance(n, ast.Name) and n.id == "Study" for n in ast.walk(node))


def _is_update_of_study(node: ast.AST) -> bool:
    """``update(Study)`` / ``update(Study.__table__)`` / ``sa.update(Study)``."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    target = node.args[0]
    while isinstance(target, ast.Attribute):
        target = target.value
    return name == "update" and isinstance(target, ast.Name) and target.id == "Study"


def _chain_has_update_of_study(node: ast.AST) -> bool:
    while True:
        if _is_update_of_study(node):
            return True
        if isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Attribute):
            node = node.value
        else:
            return False


def _sets_owned(call: ast.Call) -> bool:
    for kw in call.keywords:
        if kw.arg is None or kw.arg in OWNED:  # **values: unknown columns
            return True
    for arg in call.args:
        if isinstance(arg, ast.Dict):
            for key in arg.keys:
                if key is None:
                    return True
                if isinstance(key, ast.Constant) and key.value in OWNED:
                    return True
                if isinstance(key, ast.Attribute) and key.attr in OWNED:
                    return True
        else:
            return True  # a mapping built elsewhere: unknown columns
    return False


def _sql_writes_owned(text_parts: list[str], formatted: bool) -> bool:
    whole = "\x00".join(text_parts)
    match = _UPDATE_STUDY.search(whole)
    if match is None:
        return False
    rest = match.group("rest")
    return bool(_OWNED_COLUMN.search(rest)) or (formatted and "\x00" in rest) or (formatted and not rest.strip())


class _Finder(ast.NodeVisitor):
    def __init__(self, study_functions: set[str]) -> None:
        self.study_functions = study_functions
        self.found: list[tuple[int, str]] = []
        self.scopes: list[set[str]] = [set()]
        self.updates: list[set[str]] = [set()]  # names bound to update(Study) statements

    # -- which names hold a Study ---------------------------------------------------------
    def _bind(self, target: ast.AST) -> None:
        for sub in ast.walk(target):
            if isinstance(sub, ast.Name):
                self.scopes[-1].add(sub.id)

    def _holds_study(self, node: ast.AST) -> bool:
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        return isinstance(node, ast.Name) and any(node.id in scope for scope in self.scopes)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        scope = set()
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            if _is_study_annotation(arg.annotation):
                scope.add(arg.arg)
        self.scopes.append(scope)
        self.updates.append(set())
        self.generic_visit(node)
        self.scopes.pop()
        self.updates.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def _is_update_chain(self, node: ast.AST) -> bool:
        if _chain_has_update_of_study(node):
            return True
        while isinstance(node, (ast.Call, ast.Attribute)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return isinstance(node, ast.Name) and any(node.id in names for names in self.updates)

    def visit_Assign(self, node: ast.Assign) -> None:
        if self._is_update_chain(node.value):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.updates[-1].add(target.id)
        if _mentions_study(node.value, self.study_functions):
            for target in node.targets:
                if not isinstance(target, (ast.Attribute, ast.Subscript)):
                    self._bind(target)
        for target in node.targets:
            self._check_target(target, node.lineno)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if isinstance(node.target, ast.Name) and (
            _is_study_annotation(node.annotation)
            or (node.value is not None and _mentions_study(node.value, self.study_functions))
        ):
            self._bind(node.target)
        self._check_target(node.target, node.lineno)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._check_target(node.target, node.lineno)
        self.generic_visit(node)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        if _mentions_study(node.iter, self.study_functions):
            self._bind(node.target)
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def visit_comprehension(self, node: ast.comprehension) -> None:
        if _mentions_study(node.iter, self.study_functions):
            self._bind(node.target)
        self.generic_visit(node)

    def visit_withitem(self, node: ast.withitem) -> None:
        if node.optional_vars is not None and _mentions_study(node.context_expr, self.study_functions):
            self._bind(node.optional_vars)
        self.generic_visit(node)

    # -- the writes ------------------------------------------------------------------------
    def _check_target(self, target: ast.AST, line: int) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self._check_target(elt, line)
        elif isinstance(target, ast.Attribute) and target.attr in OWNED and self._holds_study(target.value):
            self.found.append((line, f"assigns Study.{target.attr}"))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "setattr" and len(node.args) >= 2:
            attr = node.args[1]
            if self._holds_study(node.args[0]) and (not isinstance(attr, ast.Constant) or attr.value in OWNED):
                self.found.append((node.lineno, "setattr on a Study's lifecycle column"))
        if isinstance(func, ast.Name) and func.id == "Study" and any(kw.arg in OWNED for kw in node.keywords):
            self.found.append((node.lineno, "constructs a Study with a lifecycle column"))
        if (isinstance(func, ast.Attribute) and func.attr == "values" and self._is_update_chain(func.value)
                and _sets_owned(node)):
            self.found.append((node.lineno, "update(Study).values(...) sets a lifecycle column"))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and _sql_writes_owned([node.value], formatted=False):
            self.found.append((node.lineno, "SQL UPDATE study SET of a lifecycle column"))

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        parts = [v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "\x00" for v in node.values]
        formatted = any(not isinstance(v, ast.Constant) for v in node.values)
        if _sql_writes_owned(["".join(parts)], formatted=formatted):
            self.found.append((node.lineno, "SQL UPDATE study SET of a lifecycle column (formatted)"))
        # its constant parts are not visited again: a plain constant is checked in visit_Constant


def _study_functions(tree: ast.Module) -> set[str]:
    """Functions of the module (and the index's) that return a Study."""
    names = {"study_by_uid"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_study_annotation(node.returns):
            names.add(node.name)
    return names


def lifecycle_writes(source: str) -> list[tuple[int, str]]:
    """(line, what) of every write of a study's lifecycle column in ``source``."""
    tree = ast.parse(source)
    finder = _Finder(_study_functions(tree))
    finder.visit(tree)
    return sorted(finder.found)


def test_nothing_but_the_lifecycle_writes_a_studys_state() -> None:
    offenders = []
    scanned = 0
    for path in _sources():
        if path == OWNER:
            continue
        scanned += 1
        for line, what in lifecycle_writes(path.read_text("utf-8")):
            offenders.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert scanned > 50  # the scan saw the packages
    assert not offenders, "only integrations/dicom/lifecycle.py may write these:\n" + "\n".join(offenders)


def test_the_lifecycle_module_is_what_the_scan_would_catch() -> None:
    """The owner itself writes state: the scan must see that (else it proves nothing)."""
    found = lifecycle_writes(OWNER.read_text("utf-8"))
    assert any("UPDATE study SET" in what for _, what in found)


@pytest.mark.parametrize("source", [
    "def f(study: Study):\n    study.state = 'drafted'\n",
    "def f(s):\n    study = s.get(Study, 1)\n    study.attempts += 1\n",
    "def f(s):\n    st = study_by_uid(s, 'x')\n    st.version = 2\n",
    "def f(s):\n    for st in s.exec(select(Study)).all():\n        st.state_changed_at = now\n",
    "def f(s):\n    s.exec(update(Study).where(Study.id == 1).values(state='x'))\n",
    "def f(s):\n    s.exec(sa.update(Study.__table__).values({Study.version: 3}))\n",
    "def f(s, v):\n    s.exec(update(Study).values(**v))\n",
    "def f(s, v):\n    stmt = update(Study).where(Study.id == 1)\n    stmt = stmt.where(x)\n    s.exec(stmt.values(state=v))\n",
    "def f(s):\n    s.exec(text('UPDATE study SET state = :s WHERE id = :i'))\n",
    "def f(c, cols):\n    c.execute(f\"UPDATE study SET {cols} WHERE id = ?\")\n",
    "def f(c):\n    c.execute('update  study set failure_reason = NULL')\n",
    "def f():\n    return Study(study_instance_uid='1', state='drafted')\n",
    "def f(study: Study):\n    setattr(study, 'state', 'x')\n",
    "def g(s) -> Study: ...\ndef f(s):\n    x = g(s)\n    x.state = 'y'\n",
])
def test_the_scan_catches(source: str) -> None:
    assert lifecycle_writes(source)


@pytest.mark.parametrize("source", [
    "def f(row):\n    row.state = OutboxState.pending.value\n",  # another table's state
    "def f(s):\n    s.exec(update(Study).where(Study.id == 1).values(description='x'))\n",
    "def f(s):\n    s.exec(update(DraftRecord).values(version=1, superseded=True))\n",
    "def f(s):\n    stmt = update(DraftRecord)\n    s.exec(stmt.values(version=1))\n",
    "def f(c):\n    c.execute('UPDATE study SET last_received_at = ? WHERE id = ?')\n",
    "def f(c):\n    c.execute('UPDATE study_notes SET state = 1')\n",
    "def f(s):\n    study = s.get(Study, 1)\n    study.description = 'x'\n",
    "def f():\n    return Study(study_instance_uid='1', patient_pk=2)\n",
])
def test_the_scan_lets_pass(source: str) -> None:
    assert not lifecycle_writes(source)
