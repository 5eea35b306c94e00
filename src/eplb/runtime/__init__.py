"""eplb.runtime"""
