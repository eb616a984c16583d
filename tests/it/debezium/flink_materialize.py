"""Materialises a file of Debezium-format change records with Flink SQL's `debezium-json`.

Usage: flink_materialize.py RECORDS_FILE

RECORDS_FILE holds one Kafka record value per line, in topic order (an empty line is a
tombstone). Flink reads it with its own `debezium-json` format (membersync's code plays no part
in the reading), and the changelog Flink derives (+I, -U, +U, -D) is applied to a multiset of
rows. Each final row is printed as `ROW <json array>` in the column order of the table below.
Exits non-zero on any Flink error (for example an update without a `before` image).
"""

import json
import sys

from pyflink.table import EnvironmentSettings, TableEnvironment
from pyflink.common import RowKind

COLUMNS = "id INT, code STRING, name STRING, big STRING, n STRING, js STRING, ts STRING, flag BOOLEAN"


def main(path):
    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    env.get_config().set("parallelism.default", "1")
    env.execute_sql(
        f"""create table changes ({COLUMNS}) with (
              'connector' = 'filesystem',
              'path' = '{path}',
              'format' = 'debezium-json',
              'debezium-json.ignore-parse-errors' = 'false'
            )"""
    )
    rows = {}
    with env.execute_sql("select * from changes").collect() as results:
        for r in results:
            key = json.dumps(list(r))
            kind = r.get_row_kind()
            if kind in (RowKind.INSERT, RowKind.UPDATE_AFTER):
                rows[key] = rows.get(key, 0) + 1
            else:
                if rows.get(key, 0) == 0:
                    sys.exit(f"Flink retracted a row it never had: {kind} {key}")
                rows[key] -= 1
    for key, count in sorted(rows.items()):
        for _ in range(count):
            print("ROW " + key)


if __name__ == "__main__":
    main(sys.argv[1])
