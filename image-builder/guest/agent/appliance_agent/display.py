"""Rich output in the worker: MIME bundles for values, and matplotlib figures shown like Jupyter's inline backend.

Nothing here imports matplotlib, numpy or pandas: objects are recognised by the _repr_*_ methods they carry
or by the classes of modules the user code has already imported.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from collections.abc import Callable

# Only for annotations (never evaluated, see the __future__ import): `typing` costs start-up time under TCG.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Long reprs are cut: the value goes over a serial line and mostly to a language model's context.
PLAIN_LIMIT = 64 << 10
RICH_LIMIT = 8 << 20

# (method, MIME type, binary?) in the order IPython prefers them.
_REPR_METHODS = (
    ("_repr_html_", "text/html", False),
    ("_repr_markdown_", "text/markdown", False),
    ("_repr_svg_", "image/svg+xml", False),
    ("_repr_png_", "image/png", True),
    ("_repr_jpeg_", "image/jpeg", True),
    ("_repr_latex_", "text/latex", False),
    ("_repr_javascript_", "application/javascript", False),
    ("_repr_pdf_", "application/pdf", True),
)
_JSON_CHECK = json.JSONEncoder(separators=(",", ":"))
PYPLOT = "matplotlib.pyplot"


def plain_text(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception as exc:
        text = f"<repr() failed: {type(exc).__name__}: {exc}>"
    if not isinstance(text, str):
        return f"<repr() returned {type(text).__name__}>"
    if len(text) > PLAIN_LIMIT:
        text = f"{text[:PLAIN_LIMIT]}… [{len(text) - PLAIN_LIMIT} more characters]"
    return text


def mime_bundle(obj: Any) -> dict[str, str]:
    """{"text/plain": repr, ...richer representations the object offers}."""
    bundle = {"text/plain": plain_text(obj)}
    figure_module = sys.modules.get("matplotlib.figure")
    if figure_module is not None and isinstance(obj, getattr(figure_module, "Figure", ())):
        png = figure_png(obj)
        if png:
            bundle["image/png"] = png
        return bundle
    if isinstance(obj, type):  # a class has the methods, unbound; IPython ignores them too
        return bundle
    for method_name, mime, binary in _REPR_METHODS:
        data = _call_repr(obj, method_name)
        if data is None:
            continue
        if binary and isinstance(data, bytes | bytearray):
            data = base64.b64encode(data).decode("ascii")
        if isinstance(data, str) and len(data) <= RICH_LIMIT:
            bundle[mime] = data
    json_data = _call_repr(obj, "_repr_json_")
    if json_data is not None and _json_size(json_data) <= RICH_LIMIT:
        bundle["application/json"] = json_data
    extra = _call_repr(obj, "_repr_mimebundle_")
    if isinstance(extra, dict):
        for mime, data in extra.items():
            if isinstance(mime, str) and mime != "text/plain" and _json_size(data) <= RICH_LIMIT:
                bundle[mime] = data
    return bundle


def raw_bundle(obj: Any) -> dict[str, Any]:
    """display(bundle, raw=True): the user's own MIME bundle, kept only where it is one (str keys, JSON values)."""
    if not isinstance(obj, dict):
        return mime_bundle(obj)
    bundle = {key: value for key, value in obj.items() if isinstance(key, str) and _json_size(value) <= RICH_LIMIT}
    if not isinstance(bundle.get("text/plain"), str):
        bundle["text/plain"] = plain_text(obj.get("text/plain", ""))
    return bundle


def _json_size(data: Any) -> int:
    """Its size as JSON, or past any limit if it is not JSON (the bundle goes over the wire as JSON)."""
    try:
        return len(_JSON_CHECK.encode(data))
    except (TypeError, ValueError, RecursionError):
        return RICH_LIMIT + 1


def _call_repr(obj: Any, name: str) -> Any:
    try:
        method = getattr(obj, name, None)
        if method is None or not callable(method):
            return None
        data = method()
    except Exception:
        return None
    if isinstance(data, tuple) and data:  # IPython allows (data, metadata)
        data = data[0]
    return data


def figure_png(figure: Any) -> str | None:
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", bbox_inches="tight")
    except Exception as exc:
        print(f"[could not render the figure: {type(exc).__name__}: {exc}]", file=sys.stderr)
        return None
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Figures:
    """Shows pyplot figures as display events: on plt.show(), and after a cell for figures it created.

    plt.show is replaced as soon as matplotlib.pyplot is imported (an import hook), so that code that
    imports pyplot and calls show() in the same cell never reaches Agg's "non-interactive" warning.
    """

    def __init__(self, emit: Callable[[Any], None]) -> None:
        self._emit = emit

    def install(self) -> None:
        sys.meta_path.insert(0, _PatchOnImport(PYPLOT, self._patch))

    def open_before_cell(self) -> frozenset[int]:
        pyplot = sys.modules.get(PYPLOT)
        if pyplot is None:
            return frozenset()
        try:
            return frozenset(pyplot.get_fignums())
        except Exception:
            return frozenset()

    def show_new(self, before: frozenset[int]) -> None:
        """After a cell: emit and close the figures it opened (and left open)."""
        if PYPLOT in sys.modules:
            self.show(lambda number: number not in before)

    def show(self, wanted: Callable[[int], bool] = lambda _: True) -> None:
        pyplot = sys.modules.get(PYPLOT)
        if pyplot is None:
            return
        try:
            numbers = [number for number in pyplot.get_fignums() if wanted(number)]
            for number in numbers:
                figure = pyplot.figure(number)
                self._emit(figure)
                pyplot.close(figure)
        except Exception as exc:
            print(f"[could not show figures: {type(exc).__name__}: {exc}]", file=sys.stderr)

    def _patch(self, pyplot: Any) -> None:
        def show(*_args: Any, **_kwargs: Any) -> None:
            """Display all open figures (appliance: as image/png display events) and close them."""
            self.show()

        pyplot.show = show


REAL_IPYTHON_DISPLAY = "IPython.core.display_functions"


def route_real_ipython(display: Callable[..., None]) -> None:
    """A real IPython (installed by the operator or %pip) outside a kernel prints what display() gets; make its
    display() the worker's, before IPython.display copies the name."""

    def patch(module: Any) -> None:
        def routed(*objs: Any, raw: bool = False, **_kwargs: Any) -> None:
            display(*objs, raw=raw)

        module.display = routed

    sys.meta_path.insert(0, _PatchOnImport(REAL_IPYTHON_DISPLAY, patch))


class _PatchOnImport:
    """A meta-path finder that lets the real finders load one module, then calls patch(module)."""

    def __init__(self, fullname: str, patch: Callable[[Any], None]) -> None:
        self._fullname = fullname
        self._patch = patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self._fullname:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, self._patch)
                return spec
        return None


class _PatchingLoader:
    def __init__(self, loader: Any, patch: Callable[[Any], None]) -> None:
        self._loader = loader
        self._patch = patch

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for inspect and linecache
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        try:
            self._patch(module)
        except Exception as exc:
            print(f"[could not hook {module.__name__}: {exc}]", file=sys.stderr)
