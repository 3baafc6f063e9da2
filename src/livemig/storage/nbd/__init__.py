"""The NBD protocol: pure codecs (``protocol``), an asyncio server (``server``), a small sync client."""
