"""mesh.hbone.h2mem: h2's SETTINGS values in lists, with h2's semantics unchanged."""

from __future__ import annotations

import collections

import h2.config
import h2.connection
from h2.settings import SettingCodes, Settings

import mesh.hbone.connection  # noqa: F401  (installs h2mem, as every HBONE process does)
from mesh.hbone import h2mem


def test_installed_settings_hold_no_deques() -> None:
    assert h2mem.install()  # again: a no-op that still says yes
    settings = Settings(client=True, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: 7})
    assert settings._settings
    assert all(isinstance(v, h2mem.SettingValues) for v in settings._settings.values())
    settings[SettingCodes.MAX_HEADER_LIST_SIZE] = 1000  # a key it did not have
    assert not any(type(v) is collections.deque for v in settings._settings.values())


def test_values_change_only_when_acknowledged() -> None:
    settings = Settings(client=True)
    settings[SettingCodes.INITIAL_WINDOW_SIZE] = 1000
    assert settings.initial_window_size == 65535
    changed = settings.acknowledge()
    assert settings.initial_window_size == 1000
    assert changed[SettingCodes.INITIAL_WINDOW_SIZE].original_value == 65535
    assert changed[SettingCodes.INITIAL_WINDOW_SIZE].new_value == 1000


def test_two_h2_peers_exchange_and_acknowledge_settings() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.local_settings = Settings(
        client=True, initial_values={SettingCodes.MAX_FRAME_SIZE: 65536}
    )
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the client's ACK of the server's SETTINGS
    assert server.remote_settings.max_frame_size == 65536
    assert client.local_settings.max_frame_size == 65536
    for peer in (client, server):
        for settings in (peer.local_settings, peer.remote_settings):
            assert not any(type(v) is collections.deque for v in settings._settings.values())
