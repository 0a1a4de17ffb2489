"""OCI images: import (OCI layout, OCI archive, docker-save tarball), a content-addressed store
in the cache shared by every image, and the unpacked / packed forms the backends run.

    digest.py    sha256 digests: parsing and verified reading
    source.py    where an image comes from: a layout directory or a tar archive, read-only
    manifest.py  index -> manifest -> config for linux/amd64, every blob verified
    unpack.py    one layer tar -> one directory, overlayfs whiteouts, nothing outside it
    store.py     blobs, unpacked layers, image names; import / ls / rm / garbage collection
    write.py     layer tars and archives (export, and test images made at test time)

See docs/images.md ("OCI images").
"""
