"""``nofc view``: pan and zoom over an image and its map in the browser.

``view(result, image=None, port=None, level=None)`` serves a page on ``127.0.0.1`` that
shows the image as a deep-zoom pyramid (OpenSeadragon, shipped with nofc: no network
needed; a slide at level 0 unless ``level`` says otherwise) and the map (a zarr store or a
GeoTIFF) as an overlay aligned by its geometry: each cell a square centred on its window's
centre, in level-0 pixels whatever level or pixel size the map was computed at, or in map
coordinates for a raster. A class selector (the classes with the highest peak probability
first, then the class view with its legend), an opacity slider, a probability threshold,
a palette and a colour bar choose what is drawn; the readout shows the cell under the
pointer, its window box, its most probable classes and the pointer in microns or map
coordinates; a scale bar gives lengths. The map is drawn from the stored scores (softmax
over the classes for display). Rasters other than 8-bit are stretched, nodata transparent.

``export_viewer(result, out_dir)`` writes the same page with every tile to a folder that
any static HTTP server can serve.

>>> sorted(__all__)
['export_viewer', 'serve', 'view']
"""

from .server import export_viewer, serve, view

__all__ = ["view", "serve", "export_viewer"]
