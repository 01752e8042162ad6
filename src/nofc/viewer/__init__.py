"""``nofc view``: pan and zoom over an image and its map in the browser.

``view(result, image=None, port=None)`` serves a page on ``127.0.0.1`` that shows the image
as a deep-zoom pyramid (OpenSeadragon, shipped with nofc: no network needed) and the map as
an overlay aligned by the geometry: each cell a ``step``-sized square centred on its
window's centre. A class selector (the classes with the highest peak probability first),
an opacity slider, a probability threshold, a palette and a colour bar choose what is
drawn; the readout shows the cell under the pointer, its window box and its most probable
classes. The map is drawn from the stored scores (softmax over the classes for display).

``export_viewer(result, out_dir)`` writes the same page with every tile to a folder that
any static HTTP server can serve.

>>> sorted(__all__)
['export_viewer', 'serve', 'view']
"""

from .server import export_viewer, serve, view

__all__ = ["view", "serve", "export_viewer"]
