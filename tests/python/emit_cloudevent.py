"""Sends one usage event to Tally with the official CloudEvents SDK (structured mode).

    emit_cloudevent.py URL ID SUBJECT DATA_JSON [API_KEY]

Prints the reply's status and body; exits 1 unless Tally answered 202.
"""
import json
import sys
import urllib.request

from cloudevents.http import CloudEvent, to_structured


def main() -> int:
    url, event_id, subject, data = sys.argv[1:5]
    key = sys.argv[5] if len(sys.argv) > 5 else None
    event = CloudEvent(
        {
            "type": "request",
            "source": "edge-python",
            "id": event_id,
            "subject": subject,
        },
        json.loads(data),
    )
    headers, body = to_structured(event)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    print(status, text)
    return 0 if status == 202 else 1


if __name__ == "__main__":
    sys.exit(main())
