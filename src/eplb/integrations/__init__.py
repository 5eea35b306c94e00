"""eplb.integrations"""
