"""`eir-server load`: an S13 load generator for any EIR (ours, another vendor's, an OTP one).

Pure parts (IMEI sources, histogram, request templates, answer classification, report) are
plain functions; `client.py` is the asyncio shell that drives the connections.
"""
