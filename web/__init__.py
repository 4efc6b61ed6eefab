"""The web page (chat consultation, review queue): `create_app(settings)`, served by `grandrounds serve`."""


def create_app(*args, **kwargs):
    from web.server import create_app as _create

    return _create(*args, **kwargs)
