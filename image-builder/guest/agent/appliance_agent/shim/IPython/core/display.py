"""The display classes and functions of IPython.core.display: objects that carry a MIME representation.

Each class's text/plain is IPython's default `<IPython.core.display.NAME object>`; the worker's display()
(a builtin) turns an object into a MIME bundle through its _repr_*_ methods, as IPython's formatters do.
"""

import base64
import builtins
import json as _json

__all__ = [
    "HTML",
    "JSON",
    "SVG",
    "Code",
    "DisplayHandle",
    "DisplayObject",
    "Image",
    "Javascript",
    "Latex",
    "Markdown",
    "Pretty",
    "clear_output",
    "display",
    "display_html",
    "display_javascript",
    "display_jpeg",
    "display_json",
    "display_latex",
    "display_markdown",
    "display_png",
    "display_pretty",
    "display_svg",
    "update_display",
]


def display(*objs, include=None, exclude=None, metadata=None, transient=None, display_id=None, raw=False,
            clear=False, **kwargs):
    builtins.display(*objs, raw=raw)
    if display_id is not None:
        return DisplayHandle(display_id)
    return None


def clear_output(wait=False):
    """Nothing to clear: displays are a list in the exec's result, not a notebook's output area."""


def update_display(obj, *, display_id, **kwargs):
    """A result cannot be changed once shown: the new version is shown after it."""
    builtins.display(obj)


class DisplayHandle:
    def __init__(self, display_id=None):
        self.display_id = display_id

    def display(self, obj, **kwargs):
        builtins.display(obj)

    def update(self, obj, **kwargs):
        builtins.display(obj)


class DisplayObject:
    _read_flags = "r"

    def __init__(self, data=None, url=None, filename=None, metadata=None):
        if isinstance(data, str) and data.startswith(("http://", "https://")) and url is None:
            url, data = data, None
        self.data, self.url, self.filename, self.metadata = data, url, filename, metadata or {}
        if filename is not None and data is None:
            with open(filename, self._read_flags) as handle:
                self.data = handle.read()

    def __repr__(self):
        return f"<IPython.core.display.{type(self).__name__} object>"


class TextDisplayObject(DisplayObject):
    pass


class HTML(TextDisplayObject):
    def _repr_html_(self):
        return self.data


class Markdown(TextDisplayObject):
    def _repr_markdown_(self):
        return self.data


class Latex(TextDisplayObject):
    def _repr_latex_(self):
        return self.data


class SVG(DisplayObject):
    def _repr_svg_(self):
        return self.data


class Pretty(TextDisplayObject):
    def __repr__(self):
        return str(self.data)


class Code(TextDisplayObject):
    def __init__(self, data=None, url=None, filename=None, language=None):
        super().__init__(data, url, filename)
        self.language = language

    def __repr__(self):
        return str(self.data)


class Javascript(TextDisplayObject):
    def _repr_javascript_(self):
        return self.data


class JSON(DisplayObject):
    def __init__(self, data=None, url=None, filename=None, expanded=False, metadata=None, root="root", **kwargs):
        if isinstance(data, str) and not data.startswith(("http://", "https://")):
            data = _json.loads(data)
        super().__init__(data, url, filename, metadata)
        if filename is not None and isinstance(self.data, str):
            self.data = _json.loads(self.data)

    def _repr_json_(self):
        return self.data


_FORMATS = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8": "jpeg", b"GIF87a": "gif", b"GIF89a": "gif"}


class Image(DisplayObject):
    _read_flags = "rb"

    def __init__(self, data=None, url=None, filename=None, format=None, embed=None, width=None, height=None,
                 retina=False, unconfined=False, metadata=None, alt=None):
        if isinstance(data, str) and not data.startswith(("http://", "https://")) and data:
            filename, data = data, None  # IPython: a string that is not a URL names a file
        super().__init__(data, url, filename, metadata)
        self.embed = embed if embed is not None else self.url is None
        self.width, self.height, self.alt = width, height, alt
        self.format = (format or self._guess()).lower().replace("jpg", "jpeg")

    def _guess(self):
        if isinstance(self.data, (bytes, bytearray)):
            for magic, name in _FORMATS.items():
                if bytes(self.data).startswith(magic):
                    return name
        source = (self.filename or self.url or "").lower()
        for name in ("png", "jpeg", "jpg", "gif"):
            if source.endswith("." + name):
                return name
        return "png"

    def _data_for(self, name):
        if self.embed and self.format == name and self.data is not None:
            return bytes(self.data)
        return None

    def _repr_png_(self):
        return self._data_for("png")

    def _repr_jpeg_(self):
        return self._data_for("jpeg")

    def _repr_html_(self):
        if self.embed:
            return None
        size = "".join(f' {n}="{v}"' for n, v in (("width", self.width), ("height", self.height)) if v)
        return f'<img src="{self.url}"{size}/>'

    def _repr_mimebundle_(self, include=None, exclude=None):
        if self.embed and self.format == "gif" and self.data is not None:
            return {"image/gif": base64.b64encode(bytes(self.data)).decode("ascii")}
        return None


def _display_as(method):
    def show(*objs, raw=False, metadata=None):
        for obj in objs:
            if raw:
                builtins.display({method: obj}, raw=True)
            else:
                builtins.display(obj)
    return show


display_html = _display_as("text/html")
display_markdown = _display_as("text/markdown")
display_latex = _display_as("text/latex")
display_svg = _display_as("image/svg+xml")
display_json = _display_as("application/json")
display_javascript = _display_as("application/javascript")
display_png = _display_as("image/png")
display_jpeg = _display_as("image/jpeg")
display_pretty = _display_as("text/plain")
