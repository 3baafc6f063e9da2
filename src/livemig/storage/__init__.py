"""blockd: block volumes over NBD with write fencing.

Modules, one job each: ``volumes`` (sparse files + their metadata), ``fencing`` (attachments and
the single-writer rule), ``blockd`` (joins the two for the NBD server and the API), ``nbd/``
(wire codecs, server, a small client), ``api`` (admin REST), ``service`` (runs it all in one
event loop).
"""
