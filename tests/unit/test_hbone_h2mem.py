"""mesh.hbone.h2mem: h2's SETTINGS values in lists, with h2's semantics unchanged."""

from __future__ import annotations

import collections

import h2.config
import h2.connection
import hpack
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


def test_hpack_tables_in_lists_encode_and_evict_as_with_deques() -> None:
    """Many distinct headers through a small dynamic table (evictions all along): the same
    bytes as hpack's own deque-backed table, and they decode back."""
    encoder, reference, decoder = hpack.Encoder(), hpack.Encoder(), hpack.Decoder()
    assert isinstance(encoder.header_table.dynamic_entries, h2mem.TableEntries)
    assert isinstance(decoder.header_table.dynamic_entries, h2mem.TableEntries)
    reference.header_table.dynamic_entries = collections.deque()
    for table in (encoder, reference):
        table.header_table_size = 256
    decoder.header_table_size = 256
    for i in range(200):
        headers = [(":authority", f"10.0.{i % 7}.{i}:80"), ("x-n", str(i % 13))]
        block = encoder.encode(headers)
        assert block == reference.encode(headers)
        assert decoder.decode(block) == headers
    assert 0 < len(encoder.header_table.dynamic_entries) < 200
