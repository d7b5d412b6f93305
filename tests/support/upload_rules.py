"""Rules for the upload attacks: the trucking example with a publication that accepts uploads.

A device holds its driver's row, its driver's routes and every open report; it
may rename its driver (``client_wins``), insert, update and delete routes
(``server_wins``) and file reports as its own driver (``upload_check``).
"""

from __future__ import annotations

from tests.integration import trucking

PUBLICATIONS = """\
publications:
  - name: driver
    tables:
      - table: public.drivers
        download: SELECT * FROM public.drivers WHERE device_id = :device_id
        upload: [update]
        conflict: client_wins
      - table: public.routes
        download: |
          SELECT r.* FROM public.routes r
          JOIN public.drivers d ON d.driver_id = r.driver_id
          WHERE d.device_id = :device_id
        upload: [insert, update, delete]
        conflict: server_wins
      - table: public.disruption_reports
        download: SELECT * FROM public.disruption_reports WHERE status = 'open'
        upload: [insert]
        upload_check: |
          new.reported_by = (SELECT d.driver_id FROM public.drivers d
                             WHERE d.device_id = :device_id)
"""


def rules() -> str:
    """The trucking example's rules with :data:`PUBLICATIONS` as their publications."""
    example = trucking.RULES.read_text(encoding="utf-8")
    return example[: example.index("\npublications:")] + "\n" + PUBLICATIONS
